"""The README and docs/ are the user's manual: every config block in them passes
`wakeproxy check`, every relative link points at a file (and heading) that exists, and
architecture.md's file list names every module of the package, and only those."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from wakeproxy.config import parse_yaml
from wakeproxy.control.preflight import preflight

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "wakeproxy"
_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)
# A fragment (a `shutdown:` block alone) is checked inside this minimal config.
_MINIMAL = "services:\n  fragment: {listen: 127.0.0.1:1, backend: 127.0.0.1:2, container: x}\n"


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _BLOCK.finditer(text)]


_ALL_BLOCKS = [(_name(page), line, block) for page in PAGES for line, block in _blocks(page)]


def test_the_manual_has_config_blocks_to_check() -> None:
    assert len(_blocks(README)) >= 2
    assert len(_ALL_BLOCKS) >= 9


@pytest.mark.parametrize(
    ("page", "line", "block"), _ALL_BLOCKS, ids=[f"{p} line {n}" for p, n, _ in _ALL_BLOCKS]
)
def test_every_yaml_block_in_the_manual_passes_check(page: str, line: int, block: str) -> None:
    data = yaml.safe_load(block) or {}
    labels = isinstance(data.get("discovery"), dict) and data["discovery"].get("docker_labels")
    if "services" not in data and not labels:
        block += _MINIMAL
    config = parse_yaml(block, f"{page} block at line {line}")
    errors, _ = preflight(config)
    assert errors == [], errors


# ---- links

_FENCE = re.compile(r"^ *```.*?^ *```", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def _prose(text: str) -> str:
    """The page without its code blocks: a `# comment` there is no heading, a link no link."""
    return _FENCE.sub("", text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped
    (hyphens and underscores kept), spaces as hyphens, repeats numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    result = set()
    for heading in _HEADING.findall(_prose(text)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def test_anchors_are_made_as_github_makes_them() -> None:
    text = "# HTTP mode (`mode: http`)\n```sh\n# not a heading\n```\n"
    text += "## Row 8, hibernate\n## Row 8, hibernate\n"
    assert anchors(text) == {"http-mode-mode-http", "row-8-hibernate", "row-8-hibernate-1"}


def _links() -> list[tuple[str, str]]:
    return [
        (_name(page), target)
        for page in PAGES
        for target in _LINK.findall(_prose(page.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def test_the_manual_links_its_pages() -> None:
    linked = {target.split("#")[0] for page, target in _links() if page == "README.md"}
    assert {f"docs/{page.name}" for page in PAGES[1:]} <= linked, "README must link every page"


@pytest.mark.parametrize(("page", "target"), _links(), ids=[f"{p} -> {t}" for p, t in _links()])
def test_every_relative_link_points_at_a_file_and_heading(page: str, target: str) -> None:
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.exists(), f"{page}: {target}: no such file"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file.read_text()), f"{page}: {target}: no such heading"


# ---- architecture.md's file list

_FILES_SECTION = re.compile(r"^## Files\n(.*?)(?=^## |\Z)", re.S | re.M)


def listed_files(text: str) -> list[str]:
    """The paths in the first code block of the page's "## Files" section: a tree where
    a name ending in / is a folder and each .py file is on a line of its own, indented
    two spaces per level, with what it owns after it."""
    section = _FILES_SECTION.search(text)
    assert section, 'no "## Files" section'
    block = re.search(r"^```\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, 'no code block in "## Files"'
    folders: list[str] = []
    files = []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        depth, rest = divmod(len(line) - len(line.lstrip(" ")), 2)
        name = line.split()[0]
        assert rest == 0 and depth <= len(folders), f"bad indentation: {line!r}"
        del folders[depth:]
        if name.endswith("/"):
            folders.append(name)
        elif name.endswith(".py"):
            assert folders, f"a file outside the package folder: {line!r}"
            files.append("".join(folders) + name)
        else:
            raise AssertionError(f"neither a folder nor a .py file: {line!r}")
    return files


def test_the_file_list_is_read_as_a_tree() -> None:
    text = "## Files\n\n```\npkg/\n  a.py     one\n  sub/\n    b.py   two\n  c.py     three\n```\n"
    assert listed_files(text) == ["pkg/a.py", "pkg/sub/b.py", "pkg/c.py"]


def test_architecture_lists_every_module_of_the_package() -> None:
    listed = listed_files(ARCHITECTURE.read_text())
    assert len(listed) == len(set(listed)), "a file listed twice"
    actual = {path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")}
    missing, gone = sorted(actual - set(listed)), sorted(set(listed) - actual)
    assert not (missing or gone), (
        f"docs/architecture.md's file list: not listed {missing}; listed, not there {gone}"
    )
