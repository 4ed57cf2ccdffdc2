"""YAML files in: the text parsed with the line of every key kept, so each fault names
``file:line: key.path``; keys given twice are faults too (PyYAML keeps the last silently).

Hostile or accidental files are bounded before anything walks them: the text's size, and
the document as it would be built, where aliases expand (seven lines of nested aliases
are ten million nodes: 7 s and 1.1 GB before these bounds) and may contain themselves.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .checks import Problems
from .model import Config, KeyPath
from .schema import build_config


def _key_lines(node: yaml.Node, path: KeyPath, out: dict[KeyPath, int], problems: Problems) -> None:
    """Record the line of every key; report keys given twice (PyYAML keeps the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key = key_node.value
            child = (*path, key)
            # The last occurrence wins, as it does for PyYAML's value.
            out[child] = key_node.start_mark.line + 1
            if key in seen:
                problems.add(child, "given twice; keep one")
            seen.add(key)
            _key_lines(value_node, child, out, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out.setdefault((*path, index), item.start_mark.line + 1)
            _key_lines(item, (*path, index), out, problems)


# A thousand services of a hundred keys each fit well within these.
MAX_CONFIG_BYTES = 2 * 1024 * 1024
MAX_NODES = 250_000  # scalars, mappings and sequences, with aliases expanded
MAX_DEPTH = 40
_MAX_NUMBER_TEXT = 100


def _check_shape(root: yaml.Node, source: str) -> None:
    """Bound the document as built (aliases expanded) before anything walks it: one pass
    over the node graph, each shared node measured once."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, height)
    open_nodes: set[int] = set()

    def fault(node: yaml.Node, why: str) -> ConfigError:
        return ConfigError([f"{source}:{node.start_mark.line + 1}: {why}"])

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in open_nodes:
            raise fault(node, "an alias refers to a node that contains it")
        found = measured.get(key)
        if found is None:
            if depth > MAX_DEPTH:
                raise fault(node, f"nested deeper than {MAX_DEPTH} levels")
            children: list[yaml.Node] = []
            if isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = list(node.value)
            open_nodes.add(key)
            nodes, height = 1, 0
            for child in children:
                child_nodes, child_height = measure(child, depth + 1)
                nodes += child_nodes
                height = max(height, child_height + 1)
                if nodes > MAX_NODES:
                    raise fault(node, f"over {MAX_NODES} values once its aliases are expanded")
            open_nodes.discard(key)
            found = measured[key] = (nodes, height)
        if depth + found[1] > MAX_DEPTH:
            raise fault(node, f"nested deeper than {MAX_DEPTH} levels")
        return found

    nodes, _ = measure(root, 0)
    if nodes > MAX_NODES:
        raise fault(root, f"over {MAX_NODES} values once its aliases are expanded")


class _Loader(yaml.SafeLoader):
    """SafeLoader whose value errors name their line (an integer of 5,000 digits is
    refused by int() with a ValueError that would otherwise be a traceback)."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # YAML 1.1's base-60 integers (1:2:3) cost quadratic time to build: a 2 MiB
        # one took minutes, holding the GIL. No setting needs a number this long.
        if len(str(node.value)) > _MAX_NUMBER_TEXT:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of over {_MAX_NUMBER_TEXT} characters", node.start_mark
            )
        return int(super().construct_yaml_int(node))

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {exc}", node.start_mark
            ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def parse_yaml(text: str, source: str) -> Config:
    """Parse YAML text and validate it; errors name ``source`` and the line."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: the config is over {MAX_CONFIG_BYTES // (1024 * 1024)} MiB"])
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_shape(node, source)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError([f"{where}: not valid YAML: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    except RecursionError:
        # PyYAML composes recursively: thousands of levels of brackets end here.
        raise ConfigError([f"{source}: nested deeper than {MAX_DEPTH} levels"]) from None
    lines: dict[KeyPath, int] = {}
    duplicates = Problems(source, lines)
    if node is not None:
        _key_lines(node, (), lines, duplicates)
    try:
        config = build_config(data, source=source, lines=lines)
    except ConfigError as exc:
        raise ConfigError(duplicates.items + exc.problems) from None
    if duplicates.items:
        raise ConfigError(duplicates.items)
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a config file."""
    source = str(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)  # never more than the bound into memory
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(
                [f"{source}: the config is over {MAX_CONFIG_BYTES // (1024 * 1024)} MiB"]
            )
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError(
            [f"{source}: cannot read the config file: {exc.strerror or exc}"]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: the config file is not UTF-8 text"]) from None
    return relative_to(parse_yaml(text, source), Path(os.path.abspath(path)).parent)


def relative_to(config: Config, folder: Path) -> Config:
    """``config`` with each relative path in it made absolute against ``folder``, the
    config file's: where the proxy was started from (systemd starts it from ``/``)
    changes nothing. The paths: ``cwd``, ``admin.token_file``, ``prediction.state_file``,
    ``mcp.state_file`` and ``engines.*.cert_path``. A command's arguments are not paths
    (``python3 -m http.server``): they run in ``cwd``, as written."""

    def absolute(path: str | None) -> str | None:
        return None if path is None else str(folder / path)

    replace = dataclasses.replace
    return replace(
        config,
        admin=replace(config.admin, token_file=absolute(config.admin.token_file)),
        prediction=replace(config.prediction, state_file=absolute(config.prediction.state_file)),
        mcp=replace(config.mcp, state_file=absolute(config.mcp.state_file)),
        engines={
            name: replace(engine, cert_path=absolute(engine.cert_path))
            for name, engine in config.engines.items()
        },
        services={
            name: replace(service, cwd=absolute(service.cwd))
            for name, service in config.services.items()
        },
    )
