"""What ``run`` would refuse, or find missing, checked without starting anything: so
``wakeproxy check`` says everything ``run`` would (listen clashes are the config's own
rules, in ``config.schema``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..config import Config
from ..errors import ConfigError
from ..serve.fastpath import static_reason
from .admin import checked_token


def preflight(config: Config) -> tuple[list[str], list[str]]:
    """(errors ``run`` refuses to start with, warnings about what may fail later)."""
    errors: list[str] = []
    try:
        checked_token(config.admin)
    except ConfigError as exc:
        errors += exc.problems
    warnings = [
        f"services.{cfg.name}.command: {why}"
        for cfg in config.services.values()
        if cfg.command is not None and (why := _missing(cfg.command[0], cfg.cwd, config.source))
    ]
    warnings += [
        f"services.{cfg.name}.fast_path: {unavailable}; the proxy forwards every connection"
        for cfg in config.services.values()
        if cfg.fast_path == "kernel" and (unavailable := static_reason(cfg)) is not None
    ]
    return errors, warnings


def _missing(executable: str, cwd: str | None, source: str | None) -> str | None:
    """Why ``executable`` cannot be run from here, or None. Only a warning: the proxy's
    PATH and files at run time may differ (the image, a mounted volume)."""
    if os.sep in executable:
        base = Path(cwd) if cwd else Path()
        if cwd and source and not Path(cwd).is_absolute():
            base = Path(source).parent / cwd  # as run resolves it
        path = base / executable
        if not path.exists():
            return f"{executable!r} does not exist (from {base.resolve()})"
        if not os.access(path, os.X_OK):
            return f"{executable!r} is not executable"
        return None
    if shutil.which(executable) is None:
        return f"{executable!r} is not on PATH"
    return None
