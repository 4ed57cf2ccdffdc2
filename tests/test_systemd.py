"""config/wakeproxy.service: systemd accepts it without a warning, and it runs the proxy
as docs/deploy.md says (a user of its own, reload by SIGHUP, hardened); so is its drop-in
for the fast path, config/wakeproxy-fast-path.conf (what it grants is enough for the fast
path: tests/test_fastpath.py runs the proxy with exactly that)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FAST_PATH_DROP_IN, in_ci, unit_settings

UNIT = Path(__file__).parent.parent / "config" / "wakeproxy.service"
INSTALLED = "/opt/wakeproxy/bin/wakeproxy"


def _verify(unit: Path) -> None:
    """``systemd-analyze verify`` on a unit (and the drop-ins beside it) says nothing of it."""
    if shutil.which("systemd-analyze") is None:
        if in_ci():
            pytest.fail("systemd-analyze is missing (./dev test installs Debian's systemd)")
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    about_it = [
        line for line in (result.stdout + result.stderr).splitlines() if "wakeproxy" in line
    ]
    assert result.returncode == 0 and about_it == [], result.stdout + result.stderr


def _unit_in(folder: Path) -> Path:
    """The unit, written where verify finds what ExecStart runs: this checkout's script,
    where the unit's (the install of docs/deploy.md) is not."""
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED} ") == 1
    cli = Path(sys.executable).parent / "wakeproxy"
    assert cli.exists(), "the wakeproxy script of this venv"
    unit = folder / "wakeproxy.service"
    unit.write_text(text.replace(INSTALLED, str(cli)))
    return unit


def test_systemd_analyze_verify_has_nothing_to_say(tmp_path):
    _verify(_unit_in(tmp_path))


def test_the_fast_path_drop_in_is_read_with_the_unit_and_has_nothing_to_say(tmp_path):
    unit = _unit_in(tmp_path)
    drop_ins = tmp_path / "wakeproxy.service.d"
    drop_ins.mkdir()
    (drop_ins / "fast-path.conf").write_text(FAST_PATH_DROP_IN.read_text())
    _verify(unit)
    # verify reads the drop-in: a key it does not know there would have been reported.
    (drop_ins / "fast-path.conf").write_text(FAST_PATH_DROP_IN.read_text() + "NoSuchKey=1\n")
    with pytest.raises(AssertionError, match="NoSuchKey"):
        _verify(unit)


def test_the_fast_path_drop_in_grants_what_the_fast_path_needs_and_no_more():
    granted = unit_settings(FAST_PATH_DROP_IN)
    assert granted["CapabilityBoundingSet"] == ["CAP_BPF CAP_NET_ADMIN"]
    assert granted["AmbientCapabilities"] == ["CAP_BPF CAP_NET_ADMIN"]
    assert granted["SystemCallFilter"] == ["bpf pidfd_getfd"]
    assert set(granted) == {"CapabilityBoundingSet", "AmbientCapabilities", "SystemCallFilter"}
    # The install line in its comment is the one docs/deploy.md gives.
    deploy = (UNIT.parent.parent / "docs" / "deploy.md").read_text()
    assert "/etc/systemd/system/wakeproxy.service.d/fast-path.conf" in FAST_PATH_DROP_IN.read_text()
    assert "/etc/systemd/system/wakeproxy.service.d/fast-path.conf" in deploy


def test_the_unit_runs_the_proxy_as_its_own_user_hardened():
    unit = unit_settings(UNIT)
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
