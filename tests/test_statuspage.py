"""The admin API's status page (``GET /``): what a browser shows matches ``/services``.

The browser is Debian's headless Chromium (``./dev test`` installs it): a screenshot of a
running config's page, and its DOM read back and compared with the JSON. The escaping is
checked on the renderer itself with hostile text, the read protection over real HTTP.
"""

from __future__ import annotations

import html
import json
import shutil
import struct
import subprocess
import tempfile
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    BACKEND,
    PYTHON,
    admin_call,
    backend_command,
    config_from,
    config_text,
    consecutive_ports,
    free_port,
    in_ci,
    running,
    service,
    service_yaml,
    start_proxy,
)
from wakeproxy.control import statuspage
from wakeproxy.control.statuspage import render

WINDOW = (1400, 700)


class Rows(HTMLParser):
    """The page's rows as the tests read them: per ``data-service`` (or ``data-pool``)
    row, the state and the text of each cell by its class; every element seen."""

    def __init__(self) -> None:
        super().__init__()
        self.services: dict[str, dict[str, str]] = {}
        self.pools: dict[str, dict[str, str]] = {}
        self.tags: list[str] = []
        self._row: dict[str, str] | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = {k: v or "" for k, v in attrs}
        if tag == "tr" and ("data-service" in found or "data-pool" in found):
            self._row = {"state": found["data-state"], **found}
            table = self.services if "data-service" in found else self.pools
            table[found.get("data-service") or found["data-pool"]] = self._row
        elif tag == "td" and self._row is not None:
            classes = found.get("class", "").split()
            self._cell = classes[-1] if classes else None  # a blank cell: no class
            if self._cell is not None:
                self._row[self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._cell is not None:
            self._row[self._cell] += data


def parse(document: str) -> Rows:
    rows = Rows()
    rows.feed(document)
    return rows


def test_what_users_wrote_is_shown_as_text_never_as_markup():
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    services = [
        {
            "name": "web",
            "state": "failed",
            "reason": f"start failed: {hostile}",
            "memory": {"resident_bytes": 3 << 20, "swapped_bytes": 0, "hibernated": True},
            "wakes": 2,
            "last_wake_ms": 1.5,
            "open": 0,
            "held": 0,
            "last_activity": 1000.0,
            "sleeps_in_s": None,
            "listen": "127.0.0.1:1",
            "backend": "127.0.0.1:2",
            "last_error": {"reason": hostile, "at": 990.0},
            "replica_of": None,
            "mcp": {"server": hostile, "versions": ["2025-06-18"], "answered": {hostile: 1}},
        },
        # A labelled container discovery refused: only these four keys.
        {"name": '"><b>x', "state": "failed", "source": "labels", "reason": hostile},
    ]
    page = render(services, [], {"web": 7}, version="1", now=1060.0).decode()
    rows = parse(page)
    assert "script" not in rows.tags and "img" not in rows.tags and "b" in rows.tags
    assert page.count("<b>") == 1, "only the page's own bold: the server's name"
    assert f"MCP: server <b>{html.escape(hostile)}</b>" in page
    assert rows.services["web"]["why"] == f"start failed: {hostile} (hibernated)"
    assert rows.services['"><b>x']["why"] == hostile
    assert (
        rows.services["web"] | {"wakes": "2", "forwarded": "7", "ram": "3.0 MiB"}
        == (rows.services["web"])
    )
    assert rows.services["web"]["last-activity"] == "1 min ago"


@pytest.mark.asyncio
async def test_the_page_is_behind_the_token_when_reads_are_protected(monkeypatch):
    monkeypatch.setenv("WAKEPROXY_ADMIN_TOKEN", "s3cret")
    port, backend = free_port(), free_port()
    text = service_yaml(port, backend, command='["sleep", "30"]')
    async with running(config_from(text)) as proxy:
        status, headers, body = await admin_call(proxy, "GET", "/")
        assert status == 200 and headers["content-type"] == statuspage.CONTENT_TYPE
        assert "script-src" not in headers["content-security-policy"]
        assert headers["content-security-policy"].startswith("default-src 'none'")
        assert parse(body.decode()).services["web"]["state"] == "stopped"
    text = text.replace("admin:\n", "admin:\n  protect_reads: true\n")
    async with running(config_from(text)) as proxy:
        assert (await admin_call(proxy, "GET", "/"))[0] == 401
        assert (await admin_call(proxy, "GET", "/", token="wrong"))[0] == 401
        assert (await admin_call(proxy, "GET", "/", token="s3cret"))[0] == 200


# ---- in Chromium


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a profile of its own (parallel runs share nothing); as
    root it needs --no-sandbox."""
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def get(url: str, method: str = "GET") -> Any:
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_chromium_shows_the_services_of_a_running_config_as_services_reports_them(tmp_path):
    if shutil.which("chromium") is None:
        if in_ci():
            pytest.fail("chromium is missing (./dev test installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    admin, web, web_backend, tools = free_port(), free_port(), free_port(), free_port()
    first = consecutive_ports(2)  # the replicas' backends: {port} is first + i - 1
    config = tmp_path / "config.yaml"
    config.write_text(
        config_text(
            service("web", web, web_backend, command=backend_command(web_backend),
                    sleep_policy={"idle_timeout": 600}),
            service("tools", tools, first, mode="http", replicas={"count": 2},
                    command=[PYTHON, BACKEND, "--port", "{port}", "--mode", "http"],
                    sleep_policy={"idle_timeout": 600}),
            admin=admin,
        )
    )  # fmt: skip
    proxy = start_proxy(config, admin)
    base = f"http://127.0.0.1:{admin}"
    try:
        for _ in range(2):  # the first starts the backend
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/", timeout=30) as answer:
                assert answer.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{tools}/", timeout=30) as answer:
            assert answer.status == 200
        assert get(f"{base}/services/web/sleep?force=true", "POST")["state"] == "paused"

        shot = tmp_path / "page.png"
        with tempfile.TemporaryDirectory(prefix="wp-chromium-") as profile:
            result = chromium(
                f"--screenshot={shot}", "--window-size={},{}".format(*WINDOW), f"{base}/",
                profile=Path(profile),
            )  # fmt: skip
            assert shot.exists(), result.stderr[-3000:]
            dumped = chromium("--dump-dom", f"{base}/", profile=Path(profile))
        listed = get(f"{base}/services")["services"]
        resources = get(f"{base}/metrics/resources")["services"]
    finally:
        proxy.terminate()
        proxy.communicate(timeout=60)
    data = shot.read_bytes()
    assert png_size(data) == WINDOW
    # A blank or error page compresses to a few KiB; a table of services does not.
    assert len(data) > 20_000, len(data)

    rows = parse(dumped.stdout)
    assert dumped.returncode == 0 and rows.services, dumped.stderr[-3000:]
    assert set(rows.services) == {s["name"] for s in listed} == {"web", "tools@1", "tools@2"}
    forwarded = {s["name"]: s["connections"]["by_outcome"].get("forwarded", 0) for s in resources}
    for entry in listed:
        row = rows.services[entry["name"]]
        assert row["state"] == entry["state"] and row["name"] == entry["name"], row
        assert int(row["wakes"]) == entry["wakes"], row
        assert int(row["forwarded"]) == forwarded[entry["name"]], row
        assert row["why"].startswith(entry["reason"]), row
    assert rows.services["web"]["state"] == "paused" and forwarded["web"] == 2
    assert {rows.services["tools@1"]["state"], rows.services["tools@2"]["state"]} == {
        "running",
        "stopped",
    }
    assert rows.pools["tools"]["forwarded"] == "1"
