"""Live changes (the admin API, reloads): the same validators and texts as the file, with
key paths instead of lines; and which keys a running service can take in place."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from ..errors import ConfigError, NeedsReload
from .checks import Bad, Problems, describe, section, unknown_key
from .fields import SERVICE_FIELDS, SLEEP_FIELDS, replace
from .model import KeyPath, ServiceConfig, SleepPolicy
from .policies import (
    NOT_FOR_REPLICAS,
    combination_faults,
    parse_sleep_policy,
    predicts,
    service_policy,
)

LIVE_KEYS = ("sleep_policy", "wake_timeout", "max_held_connections", "idle_connection_timeout")
# What a reload may change on a running service without closing its listener or its
# connections; a change to anything else (listen, backend, runtime...) replaces it.
IN_PLACE_KEYS = (
    *LIVE_KEYS,
    "policy",
    "policy_overrides",
    "max_connections",
    "connect_timeout",
    "connect_concurrency",
    "readiness",
    "depends_on",
    "group",
    "http",
    "auto_start",
    "image",
    "replicas",
    "resources",
)


def changes_in_place(old: ServiceConfig, new: ServiceConfig) -> bool:
    """Whether ``new`` differs from ``old`` only in keys a running service can take."""
    kept = {key: getattr(old, key) for key in IN_PLACE_KEYS}
    return dataclasses.replace(new, **kept) == old


@dataclasses.dataclass
class Applied:
    """What applying a source's services did (a reload: the file's), service by service."""

    added: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    # Changed where the running service cannot follow (listen, backend, runtime...):
    # closed and opened again, its connections with it.
    replaced: list[str] = dataclasses.field(default_factory=list)
    # Changed in place: listener and connections kept.
    updated: list[str] = dataclasses.field(default_factory=list)
    unchanged: list[str] = dataclasses.field(default_factory=list)
    # Listeners that could not open: name -> why.
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    # Sections that only a restart applies.
    needs_restart: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line for the log: the counts, and what needs a restart."""
        counts = (
            f"{len(self.added)} added, {len(self.removed)} removed, {len(self.replaced)} "
            f"replaced, {len(self.updated)} updated, {len(self.unchanged)} unchanged"
        )
        if self.needs_restart:
            counts += f"; {', '.join(self.needs_restart)} change(s) need a restart"
        return counts


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What to do to the running services so that one source's (the file's, one engine's
    labels) become what it wants now: ``plan``'s answer."""

    remove: tuple[str, ...] = ()  # it asked for them before and no longer does
    update: tuple[ServiceConfig, ...] = ()  # changed only in keys a running one takes
    replace: tuple[ServiceConfig, ...] = ()  # changed otherwise: closed, then added anew
    add: tuple[ServiceConfig, ...] = ()  # not running; or another source's, taken over
    unchanged: tuple[str, ...] = ()


def plan(
    before: Mapping[str, ServiceConfig],
    after: Mapping[str, ServiceConfig],
    running: Collection[str],
) -> Plan:
    """From what a source asked for last (``before``) to what it asks for now
    (``after``), given the names that run. Compared with what the source asked, not with
    what runs: a service whose entry did not change keeps what the API changed live."""
    remove = tuple(name for name in before if name not in after and name in running)
    update: list[ServiceConfig] = []
    replace: list[ServiceConfig] = []
    add: list[ServiceConfig] = []
    unchanged: list[str] = []
    for name, cfg in after.items():
        prior = before.get(name)
        if prior is None or name not in running:
            add.append(cfg)
        elif cfg == prior:
            unchanged.append(name)
        elif changes_in_place(prior, cfg):
            update.append(cfg)
        else:
            replace.append(cfg)
    return Plan(remove, tuple(update), tuple(replace), tuple(add), tuple(unchanged))


def update_service(
    cfg: ServiceConfig, body: Any, policies: Mapping[str, SleepPolicy]
) -> ServiceConfig:
    """``cfg`` with a partial JSON body applied; ConfigError (400) or NeedsReload (409)."""
    path: KeyPath = ("services", cfg.name)
    problems = Problems(None, {})
    if not isinstance(body, dict):
        raise ConfigError([f"expected a JSON object of settings, got {describe(body)}"])
    for key in body:
        if key not in SERVICE_FIELDS:
            problems.add((*path, str(key)), unknown_key(key, SERVICE_FIELDS))
    if problems.items:
        raise ConfigError(problems.items)
    static = [key for key in body if key not in LIVE_KEYS]
    if static:
        raise NeedsReload(f"{', '.join(static)} needs a reload; live keys: {', '.join(LIVE_KEYS)}")
    values: dict[str, Any] = {}
    for key in ("wake_timeout", "max_held_connections", "idle_connection_timeout"):
        if key in body:
            try:
                values[key] = SERVICE_FIELDS[key](body[key])
            except Bad as exc:
                problems.add((*path, key), str(exc))
    if "sleep_policy" in body:
        raw = body["sleep_policy"]
        if isinstance(raw, dict) and "use" not in raw and cfg.policy is not None:
            # Keys changed beside a named policy become overrides of it.
            raw = {"use": cfg.policy, **cfg.policy_overrides, **raw}
        sleep, name, overrides = service_policy(
            raw, (*path, "sleep_policy"), problems, policies, base=cfg.sleep_policy
        )
        values.update(sleep_policy=sleep, policy=name, policy_overrides=overrides)
    if problems.items:
        raise ConfigError(problems.items)
    updated = dataclasses.replace(cfg, **values)
    _check_combination(updated)
    return updated


def update_policy(
    policy: SleepPolicy, name: str, body: Any, followers: Iterable[ServiceConfig] = ()
) -> tuple[SleepPolicy, list[ServiceConfig]]:
    """The named policy with a partial body applied, and each service following it as it
    would then be; ConfigError when the policy, or a follower with it, breaks a rule."""
    problems = Problems(None, {})
    updated = parse_sleep_policy(body, ("policies", name), problems, base=policy)
    if problems.items:
        raise ConfigError(problems.items)
    changed = [with_policy(cfg, updated) for cfg in followers]
    faults: list[str] = []
    for cfg in changed:
        try:
            _check_combination(cfg)
        except ConfigError as exc:
            faults += exc.problems
    if faults:
        raise ConfigError(faults)
    return updated, changed


def _check_combination(cfg: ServiceConfig) -> None:
    problems = Problems(None, {})
    for where, why in combination_faults(cfg.http, cfg.sleep_policy):
        problems.add(("services", cfg.name, *where), why)
    if (cfg.replicas is not None or cfg.replica_of is not None) and predicts(cfg.sleep_policy):
        problems.add(("services", cfg.name, "sleep_policy"), NOT_FOR_REPLICAS)
    if problems.items:
        raise ConfigError(problems.items)


def with_policy(cfg: ServiceConfig, policy: SleepPolicy) -> ServiceConfig:
    """``cfg`` following a changed named policy, its own overrides still winning (they
    are kept raw and were validated when given: parsed here again, they cannot fail)."""
    path: KeyPath = ("services", cfg.name, "sleep_policy")
    typed = section(cfg.policy_overrides, path, SLEEP_FIELDS, Problems(None, {})) or {}
    return dataclasses.replace(cfg, sleep_policy=replace(policy, typed))
