"""What the admin API, metrics and views read of the running proxy (``app.Proxy``), as a
protocol: the control layer depends on the services it shows, never on the process that
assembles them."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Config, SleepPolicy
    from ..config.live import Applied
    from ..runtimes.engine import DockerEngine
    from ..serve.backend import Backend
    from ..serve.frontend import Frontend
    from ..serve.predictions import Predictions


class Running(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def services(self) -> Mapping[str, Backend]:
        """Every backend by name (a replicated service's as NAME@N)."""

    @property
    def frontends(self) -> Mapping[str, Frontend]:
        """Every service's listener by the service's name."""

    @property
    def policies(self) -> MutableMapping[str, SleepPolicy]:
        """Named policies as changed through the API."""

    @property
    def predictions(self) -> Predictions | None: ...

    @property
    def engines(self) -> Mapping[str, DockerEngine]: ...

    @property
    def discoveries(self) -> Mapping[str, object]:
        """Label discovery by engine name (empty when no engine discovers)."""

    @property
    def rejected(self) -> dict[str, str]:
        """What label discovery could not serve: service name -> why."""

    def replicated(self, name: str) -> Frontend | None:
        """The listener of service ``name`` when it has replicas."""

    async def reload(self) -> Applied:
        """Re-read the config file and apply it."""
