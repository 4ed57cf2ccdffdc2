"""Generated configs and label sets: each one loads or fails with a message naming where.

The loader must never raise anything but ConfigError, whatever the YAML holds.
"""

from __future__ import annotations

import re

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from wakeproxy.config import parse_yaml, service_from_labels
from wakeproxy.config.fields import HTTP_FIELDS, SERVICE_FIELDS, SLEEP_FIELDS, TOP_FIELDS
from wakeproxy.config.labels import _LABEL_PATHS
from wakeproxy.config.model import DEFAULT_ALLOWED_LISTEN
from wakeproxy.config.source import MAX_NODES
from wakeproxy.errors import ConfigError

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.integers(min_value=10**18, max_value=10**420),  # past 64 bits, past float
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["127.0.0.1:8080", "[::1]:80", "stop", "pause", "http", "tcp", "1.5", "256MiB"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def section(keys: list[str]) -> st.SearchStrategy[dict[str, object]]:
    """Mostly known keys (so the deeper checks run), sometimes unknown ones."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=10), values, max_size=6)


service = st.fixed_dictionaries(
    {},
    optional={
        "listen": st.sampled_from(["127.0.0.1:18000", "0.0.0.0:80", "x:1", "[::1]:9"]) | values,
        "backend": st.sampled_from(["127.0.0.1:18001", "127.0.0.1:18000"]) | values,
        "container": st.text(max_size=10) | values,
        "command": st.lists(st.text(max_size=5), max_size=3) | values,
        "sleep_policy": section([*SLEEP_FIELDS, "use"]) | values,
        "http": section(list(HTTP_FIELDS)) | values,
        "mode": st.sampled_from(["tcp", "http"]) | values,
    },
).flatmap(lambda fixed: section(list(SERVICE_FIELDS)).map(lambda extra: {**extra, **fixed}))
configs = st.fixed_dictionaries(
    {},
    optional={
        "services": st.dictionaries(st.text(max_size=12), service | values, max_size=3) | values,
        "policies": st.dictionaries(st.text(max_size=8), section(list(SLEEP_FIELDS)), max_size=2),
        "admin": values,
        "log": values,
        "discovery": values,
        "shutdown": values,
    },
).flatmap(lambda fixed: section(list(TOP_FIELDS)).map(lambda extra: {**extra, **fixed}))


@settings(max_examples=400, deadline=None)
@given(configs)
def test_generated_configs_load_or_name_the_fault(data: dict[str, object]) -> None:
    text = yaml.safe_dump(data, allow_unicode=True)
    try:
        parse_yaml(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.startswith("fuzz.yaml"), problem
            assert ": " in problem.removeprefix("fuzz.yaml"), problem


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([f"wakeproxy.{k}" for k in _LABEL_PATHS] + ["wakeproxy.name"])
        | st.text(max_size=15),
        st.text(max_size=12) | st.sampled_from(["8080", "127.0.0.1:9000", "true", "1e9", "-1"]),
        max_size=6,
    )
)
def test_generated_label_sets_build_a_service_or_name_the_container(labels: dict[str, str]):
    try:
        service_from_labels(
            "c1",
            {"wakeproxy.enable": "true", **labels},
            policies={},
            allowed_listen=DEFAULT_ALLOWED_LISTEN,
        )
    except ConfigError as exc:
        assert exc.problems
        assert all(p.startswith("container c1") for p in exc.problems), exc.problems


@settings(max_examples=200, deadline=None)
@given(
    width=st.integers(min_value=1, max_value=12),
    depth=st.integers(min_value=1, max_value=8),
    recursive=st.booleans(),
)
def test_aliases_expand_within_the_bound_or_are_refused_with_their_line(
    width: int, depth: int, recursive: bool
) -> None:
    # Level k is a list of `width` aliases of level k-1: width**depth values once
    # expanded, in depth lines (the classic alias bomb at width 10).
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * width)}]" for k in range(1, depth)]
    if recursive:
        lines.append("r: &r [*r]")
    sizes = [1 + width]
    for _ in range(1, depth):
        sizes.append(1 + width * sizes[-1])
    expanded = 1 + sum(1 + size for size in sizes)  # the top mapping, each key, its value
    try:
        parse_yaml("\n".join(lines), "a.yaml")
    except ConfigError as exc:
        [problem, *_] = exc.problems
        assert re.match(r"a\.yaml:\d+: ", problem), problem
        if expanded > MAX_NODES:
            assert f"over {MAX_NODES} values once its aliases are expanded" in problem
        elif recursive:
            assert "an alias refers to a node that contains it" in problem
        else:
            assert "unknown key 'l0'" in problem
    else:
        raise AssertionError("a top-level 'l0' key must be refused")
