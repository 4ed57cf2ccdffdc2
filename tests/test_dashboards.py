"""config/grafana-dashboard.json and config/prometheus-alerts.yml against the proxy itself.

Every metric they name is one a running proxy exports (scraped from /metrics, with the
_total, _bucket, _sum and _count names as exported); every dashboard query parses as PromQL
(promtool checks it as a recording rule) and is filtered by the ``$service`` variable; the
alert rules pass ``promtool check rules`` and fire, in ``promtool test rules``, when they
should and not before. promtool is in Debian's ``prometheus`` package (``./dev test``
installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    BACKEND,
    PYTHON,
    admin_call,
    backend_command,
    build,
    consecutive_ports,
    free_port,
    in_ci,
    running,
    service,
)

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
ALERTS = ROOT / "config" / "prometheus-alerts.yml"
# promtool's own test format: series, times, the alerts expected with their annotations.
ALERT_CASES = Path(__file__).parent / "prometheus-alerts-test.yml"
METRIC = re.compile(r"\bwakeproxy_[a-z0-9_]+\b")
# The proxy's own series, not a service's: no service label to filter by.
PROXY_WIDE = {"wakeproxy_engine_up", "wakeproxy_build_info"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, rows' panels included."""
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend((panel["title"], t["expr"]) for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        if in_ci():
            pytest.fail("promtool is missing (./dev test installs Debian's prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def exported(scrape: str) -> set[str]:
    """Every series name the scrape offers: the samples' names, and for each family the
    names its type exports even while it has no sample yet (a counter's _total, a
    histogram's _bucket, _sum, _count)."""
    names = set()
    for line in scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            names.update(name + suffix for suffix in suffixes)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.mark.asyncio
async def test_every_metric_the_dashboard_and_the_alerts_name_is_exported(monkeypatch):
    # Families that exist only with their feature: prediction (arrivals), replicas, mode
    # http's MCP, and a Docker engine (DOCKER_HOST pointing nowhere: engine_up 0).
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/wakeproxy-test.sock")
    web, tools, box = free_port(), free_port(), free_port()
    first, web_backend = consecutive_ports(2), free_port()
    config = build(
        service("web", web, web_backend, command=backend_command(web_backend),
                sleep_policy={"idle_timeout": 600, "predict": {"arrivals": True}}),
        service("tools", tools, first, mode="http", replicas={"count": 2},
                command=[PYTHON, BACKEND, "--port", "{port}"]),
        service("box", box, free_port(), container="wp-test-no-such-container"),
        prediction={"state_file": None},
    )  # fmt: skip
    async with running(config) as proxy:
        status, _, body = await admin_call(proxy, "GET", "/metrics")
    assert status == 200
    names = exported(body.decode())
    assert {"wakeproxy_engine_up", "wakeproxy_replicas", "wakeproxy_mcp_answered_total"} <= names

    used = {name for _, query in dashboard_queries() for name in METRIC.findall(query)}
    alerting = {name for rule in alert_rules() for name in METRIC.findall(rule["expr"])}
    assert used - names == set(), "the dashboard names metrics the proxy does not export"
    assert alerting - names == set(), "the alerts name metrics the proxy does not export"
    # What the dashboard is for (docs/metrics.md#dashboard).
    assert {
        "wakeproxy_wakes_total",
        "wakeproxy_wake_seconds_bucket",
        "wakeproxy_service_state",
        "wakeproxy_reclaimed_bytes_total",
        "wakeproxy_backend_resident_bytes",
        "wakeproxy_backend_swapped_bytes",
        "wakeproxy_connections_held",
        "wakeproxy_connections_total",
        "wakeproxy_mcp_answered_total",
    } <= used
    assert {
        "wakeproxy_wakes_total",
        "wakeproxy_service_state",
        "wakeproxy_connections_total",
        "wakeproxy_engine_up",
        "wakeproxy_mcp_replays_failed_total",
    } <= alerting


def test_every_dashboard_query_is_promql_filtered_by_the_service_variable(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["service"]["multi"] and variables["service"]["includeAll"]
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, query in queries:
        names = set(METRIC.findall(query))
        assert names, f"{title}: {query} names no wakeproxy metric"
        if names - PROXY_WIDE:
            assert 'service=~"$service"' in query, f"{title}: {query} ignores $service"
    quantiles = [q for _, q in queries if "histogram_quantile" in q]
    assert {q.split(",")[0] for q in quantiles} >= {
        "histogram_quantile(0.5",
        "histogram_quantile(0.9",
        "histogram_quantile(0.99",
    }
    # Grafana's variables as a query would reach Prometheus; each query a recording rule.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(query)}
        for i, (_, query) in enumerate(queries)
    ]
    file = tmp_path / "dashboard-rules.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(file))
    assert result.returncode == 0, result.stdout + result.stderr


def substitute(query: str) -> str:
    for variable, value in (("$__rate_interval", "2m"), ("$__range", "6h"), ("$service", ".*")):
        query = query.replace(variable, value)
    return query


def test_the_alert_rules_pass_promtool_and_fire_when_they_should():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0 and "SUCCESS: 6 rules found" in result.stdout, (
        result.stdout + result.stderr
    )
    result = promtool("test", "rules", str(ALERT_CASES))
    assert result.returncode == 0, result.stdout + result.stderr
