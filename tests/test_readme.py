"""The README is the user's manual: every config block in it passes `wakeproxy check`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from wakeproxy.config import parse_yaml
from wakeproxy.preflight import preflight

README = Path(__file__).parent.parent / "README.md"
_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)
# A fragment (a `shutdown:` block alone) is checked inside this minimal config.
_MINIMAL = "services:\n  fragment: {listen: 127.0.0.1:1, backend: 127.0.0.1:2, container: x}\n"


def _blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _BLOCK.finditer(text)]


def test_the_readme_has_config_blocks_to_check() -> None:
    assert len(_blocks()) >= 4


@pytest.mark.parametrize(("line", "block"), _blocks(), ids=[f"line {n}" for n, _ in _blocks()])
def test_every_yaml_block_in_the_readme_passes_check(line: int, block: str) -> None:
    data = yaml.safe_load(block) or {}
    labels = isinstance(data.get("discovery"), dict) and data["discovery"].get("docker_labels")
    if "services" not in data and not labels:
        block += _MINIMAL
    config = parse_yaml(block, f"README.md block at line {line}")
    errors, _ = preflight(config)
    assert errors == [], errors
