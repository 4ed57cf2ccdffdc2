"""config/wakeproxy.service: systemd accepts it without a warning, and it runs the proxy
as docs/deploy.md says (a user of its own, reload by SIGHUP, hardened)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import in_ci

UNIT = Path(__file__).parent.parent / "config" / "wakeproxy.service"
INSTALLED = "/opt/wakeproxy/bin/wakeproxy"


def settings() -> dict[str, list[str]]:
    """Each key of the [Service] section with its values (a key may be given twice)."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_systemd_analyze_verify_has_nothing_to_say(tmp_path):
    if shutil.which("systemd-analyze") is None:
        if in_ci():
            pytest.fail("systemd-analyze is missing (./dev test installs Debian's systemd)")
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's program exists: this checkout's, where the unit's
    # (the install of docs/deploy.md) is not.
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED} ") == 1
    cli = Path(sys.executable).parent / "wakeproxy"
    assert cli.exists(), "the wakeproxy script of this venv"
    unit = tmp_path / "wakeproxy.service"
    unit.write_text(text.replace(INSTALLED, str(cli)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    about_it = [
        line for line in (result.stdout + result.stderr).splitlines() if "wakeproxy" in line
    ]
    assert result.returncode == 0 and about_it == [], result.stdout + result.stderr


def test_the_unit_runs_the_proxy_as_its_own_user_hardened():
    unit = settings()
    assert unit["User"] == ["wakeproxy"] and unit["Group"] == ["wakeproxy"]
    assert unit["ExecStart"] == [f"{INSTALLED} run"]
    assert "WAKEPROXY_CONFIG=/etc/wakeproxy/config.yaml" in unit["Environment"]
    # The proxy reloads on SIGHUP (tests/test_faults.py sends one to a running proxy).
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    # SIGTERM to the proxy alone: it ends its commands itself, in order.
    assert unit["KillMode"] == ["mixed"]
    assert unit["StateDirectory"] == ["wakeproxy"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectControlGroups": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "SystemCallFilter": "@system-service",
    }.items():
        assert unit[key] == [value], key
