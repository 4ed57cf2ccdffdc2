"""The runtime a service's config asks for: a command, a container, or a Swarm service."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..config import ServiceConfig
from .base import Runtime
from .docker import DockerRuntime
from .engine import DockerEngine
from .process import ProcessRuntime
from .swarm import SwarmRuntime


def make_runtime(
    cfg: ServiceConfig, engine: Callable[[str], DockerEngine], config_dir: Path | None
) -> Runtime:
    """``engine``: the Docker engine of a name; ``config_dir``: the config file's folder,
    which a relative ``cwd`` is relative to (not wherever the proxy runs)."""
    if cfg.runtime == "process":
        assert cfg.command is not None
        cwd = cfg.cwd
        if cwd is not None and config_dir is not None:
            cwd = str(config_dir / cwd)
        return ProcessRuntime(
            cfg.command,
            name=cfg.name,  # its output is logged under the service's name
            cwd=cwd,
            env=cfg.env,
            stop_timeout=cfg.stop_timeout,
            # Measured memory for every command, and hibernation on demand (the API)
            # even where the policy never hibernates.
            own_cgroup=True,
        )
    if cfg.runtime == "swarm":
        assert cfg.swarm_service is not None
        return SwarmRuntime(
            engine(cfg.engine),
            cfg.swarm_service,
            replicas=cfg.swarm_replicas,
            stop_timeout=cfg.stop_timeout,
        )
    assert cfg.container is not None
    return DockerRuntime(engine(cfg.engine), cfg.container, stop_timeout=cfg.stop_timeout)
