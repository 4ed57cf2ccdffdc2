"""Configuration: YAML (or labels, or a JSON body) in, frozen dataclasses out.

Every key is checked: an unknown key, a wrong type or a bad value is reported with the
file, the line and the dotted key path (``config.yaml:14: services.web.backlog: ...``),
and all faults of a file are reported together rather than the first one alone.

``model`` holds the types; ``checks`` the validators; ``schema`` the sections and the
rules across keys; ``source`` reads YAML with lines; ``live`` applies the admin API's
changes; ``labels`` reads container and Swarm service labels.
"""

from __future__ import annotations

from .crosscheck import dependency_faults
from .labels import (
    COMPOSE_DEPENDS_ON_LABEL,
    LABEL_PREFIX,
    SWARM_SERVICE_LABEL,
    label_enabled,
    label_service_name,
    service_from_labels,
)
from .live import (
    IN_PLACE_KEYS,
    LIVE_KEYS,
    changes_in_place,
    update_policy,
    update_service,
    with_policy,
)
from .model import (
    DEFAULT_CONFIG_PATH,
    Address,
    AdminConfig,
    Config,
    DiscoveryConfig,
    HttpSettings,
    ListenRange,
    LogConfig,
    Probe,
    Readiness,
    Resources,
    ServiceConfig,
    ShutdownConfig,
    SleepPolicy,
    is_loopback,
)
from .schema import build_config
from .source import load_config, parse_yaml

__all__ = [
    "COMPOSE_DEPENDS_ON_LABEL",
    "DEFAULT_CONFIG_PATH",
    "IN_PLACE_KEYS",
    "LABEL_PREFIX",
    "LIVE_KEYS",
    "SWARM_SERVICE_LABEL",
    "Address",
    "AdminConfig",
    "Config",
    "DiscoveryConfig",
    "HttpSettings",
    "ListenRange",
    "LogConfig",
    "Probe",
    "Readiness",
    "Resources",
    "ServiceConfig",
    "ShutdownConfig",
    "SleepPolicy",
    "build_config",
    "changes_in_place",
    "dependency_faults",
    "is_loopback",
    "label_enabled",
    "label_service_name",
    "load_config",
    "parse_yaml",
    "service_from_labels",
    "update_policy",
    "update_service",
    "with_policy",
]
