"""Sleep policies in the config: a policy's keys and the rules across them, named policies
(``policies:``) and a service's ``use: NAME`` with keys that win over it. The file, the
API's live changes and a named policy's edit are all checked here, by the same rules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.states import SleepAction
from .checks import Problems, describe, section
from .fields import SLEEP_FIELDS, replace
from .model import HttpSettings, KeyPath, SleepPolicy

DEFAULT_POLICY = SleepPolicy()


def parse_sleep_policy(
    data: Any, path: KeyPath, problems: Problems, base: SleepPolicy = DEFAULT_POLICY
) -> SleepPolicy:
    values = section(data, path, SLEEP_FIELDS, problems) or {}
    policy: SleepPolicy = replace(base, values)
    for key, why in policy_faults(policy):
        problems.add((*path, key), why)
    return policy


NOT_FOR_REPLICAS = (
    "keep_awake, asleep_windows and predict are not for a service with replicas "
    "(its replicas follow the load)"
)


def predicts(policy: SleepPolicy) -> bool:
    """Whether the policy wakes ahead or by schedule (windows, arrivals, chains)."""
    predict = policy.predict
    return bool(policy.keep_awake or policy.asleep_windows or predict.arrivals or predict.chains)


def policy_faults(policy: SleepPolicy) -> list[tuple[str, str]]:
    """(key, why) for each rule across a sleep policy's keys."""
    faults = []
    if policy.stop_after is not None and policy.action is SleepAction.STOP:
        faults.append(
            (
                "stop_after",
                "stop_after turns a paused backend into a stopped one; it needs action 'pause'",
            )
        )
    if policy.hibernate_after is not None and policy.action is SleepAction.STOP:
        faults.append(
            (
                "hibernate_after",
                "hibernate_after gives a paused backend's memory back; it needs action 'pause' "
                "or 'hibernate'",
            )
        )
    return faults


def combination_faults(http: HttpSettings, sleep: SleepPolicy) -> list[tuple[KeyPath, str]]:
    """(key path under the service, why) for each rule across a service's own keys: the
    file and every live change (API, a named policy's edit) are held to the same ones."""
    faults: list[tuple[KeyPath, str]] = [
        (("sleep_policy", key), why) for key, why in policy_faults(sleep)
    ]
    if http.idle_connections == "allow-sleep" and sleep.action is SleepAction.STOP:
        faults.append(
            (
                ("http", "idle_connections"),
                "allow-sleep keeps connections open under a sleeping backend; "
                "sleep action 'stop' would cut them: use action 'pause'",
            )
        )
    return faults


def service_policy(
    data: Any,
    path: KeyPath,
    problems: Problems,
    policies: Mapping[str, SleepPolicy],
    base: SleepPolicy = DEFAULT_POLICY,
) -> tuple[SleepPolicy, str | None, dict[str, Any]]:
    """A service's sleep_policy: its own keys, or ``use: NAME`` plus keys that win over it."""
    if not (isinstance(data, dict) and "use" in data):
        return parse_sleep_policy(data, path, problems, base), None, {}
    name = data["use"]
    named = policies.get(name) if isinstance(name, str) else None
    if named is None:
        known = ", ".join(sorted(policies)) or "none"
        problems.add((*path, "use"), f"no policy named {describe(name)}; defined: {known}")
        return base, None, {}
    overrides = {k: v for k, v in data.items() if k != "use"}
    policy = parse_sleep_policy(overrides, path, problems, named)
    # Kept as given (the form they are validated in), so a later change of the named
    # policy leaves them winning and a live edit can merge them with its own raw keys
    # and validate the whole again: parsed windows or predict settings are no valid input.
    return policy, name, overrides


def parse_policies(data: Any, problems: Problems) -> dict[str, SleepPolicy]:
    if not isinstance(data, dict):
        problems.add(("policies",), f"expected a mapping of policy names, got {describe(data)}")
        return {}
    return {
        str(name): parse_sleep_policy(entry, ("policies", str(name)), problems)
        for name, entry in data.items()
    }
