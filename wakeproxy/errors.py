"""The errors wakeproxy raises: one base, a few groups an operator can act on.

Errors from aiodocker and the OS are mapped into these where they enter (see
``runtimes.engine.map_docker_errors``), so the rest of the code and every log
line speak one vocabulary.
"""

from __future__ import annotations


class WakeproxyError(Exception):
    """Base of every error wakeproxy raises on purpose."""


class ConfigError(WakeproxyError):
    """A configuration that cannot be used; ``problems`` holds one line per fault."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class RuntimeFailure(WakeproxyError):
    """A runtime operation (pause, start, inspect, ...) did not succeed."""


class EngineUnavailable(RuntimeFailure):
    """The container engine does not answer: nothing about the backend is known."""


class BackendMissing(RuntimeFailure):
    """The container or command the service names does not exist."""


class OperationFailed(RuntimeFailure):
    """The engine answered but refused or failed the operation."""


class ListenError(WakeproxyError):
    """A listen address (a service's, the admin API's) cannot be bound."""


class ServiceBusy(WakeproxyError):
    """The service cannot do that now (open connections, an operation in flight).

    ``forceable``: forcing the operation would go ahead (the API's ``?force=true``).
    """

    def __init__(self, message: str, *, forceable: bool = False) -> None:
        super().__init__(message)
        self.forceable = forceable


class WakeTimeout(RuntimeFailure):
    """The backend was not ready within the service's wake_timeout."""


class NeedsReload(WakeproxyError):
    """A setting that cannot change while the proxy runs; the file and a reload can."""
