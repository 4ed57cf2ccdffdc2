"""The process's own limits: the open-file limit raised to the hard one."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("wakeproxy")


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one: two descriptors per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit above %d: %s", soft, exc)
    return soft
