"""YAML files in: the text parsed with the line of every key kept, so each fault names
``file:line: key.path``; keys given twice are faults too (PyYAML keeps the last silently)."""

from __future__ import annotations

from pathlib import Path

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


def parse_yaml(text: str, source: str) -> Config:
    """Parse YAML text and validate it; errors name ``source`` and the line."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError([f"{where}: not valid YAML: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
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
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [f"{source}: cannot read the config file: {exc.strerror or exc}"]
        ) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{source}: the config file is not UTF-8 text"]) from None
    return parse_yaml(text, source)
