"""Config loading: every fault names file, line and key; the seed's form loads unchanged."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.helpers import build, service
from wakeproxy.config import (
    Address,
    ServiceConfig,
    build_config,
    load_config,
    parse_yaml,
    service_from_labels,
)
from wakeproxy.config.model import DEFAULT_ALLOWED_LISTEN
from wakeproxy.config.replicas import (
    COMPOSE_NUMBER,
    COMPOSE_PROJECT,
    COMPOSE_SERVICE,
    compose_members,
    expand_all,
)
from wakeproxy.control.preflight import preflight
from wakeproxy.errors import ConfigError

SEED = Path(__file__).parent.parent / "config" / "services.yml"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_yaml(textwrap.dedent(text), "c.yaml")
    return info.value.problems


def test_full_example_from_the_issue_loads():
    config = parse_yaml(
        textwrap.dedent(
            """
            admin:
              listen: 127.0.0.1:9000
            services:
              web:
                listen: 127.0.0.1:18500
                backend: 127.0.0.1:18501
                container: wp-web
                mode: tcp
                wake_on: connect
                backlog: 4096
                connect_timeout: 5
                idle_connection_timeout: 3600
                connect_concurrency: 64
                sleep_policy:
                  enabled: true
                  idle_timeout: 300
                  min_sleep_time: 60
                  priority: normal
                  action: pause
                  stop_after: 3600
                  memory_reservation: 256MB
                wake_timeout: 30
                max_held_connections: 1024
                readiness: {tcp: true}
            """
        ),
        "c.yaml",
    )
    web = config.services["web"]
    assert web.runtime == "docker" and web.container == "wp-web"
    assert web.listen == Address("127.0.0.1", 18500)
    assert web.backend == Address("127.0.0.1", 18501)
    assert web.sleep_policy.memory_reservation == 256_000_000
    assert web.sleep_policy.idle_delay == 300.0
    assert web.sleep_policy.stop_after == 3600.0
    assert config.admin.listen == Address("127.0.0.1", 9000)


def test_process_runtime_and_sizes():
    config = parse_yaml(
        textwrap.dedent(
            """
            services:
              api:
                listen: "[::1]:8080"
                backend: 127.0.0.1:8081
                command: python3 -m http.server 8081 --bind 127.0.0.1
                sleep_policy: {memory_reservation: 256MiB, min_sleep_time: 90, idle_timeout: 30}
            """
        ),
        "c.yaml",
    )
    api = config.services["api"]
    assert api.runtime == "process"
    assert api.command == ("python3", "-m", "http.server", "8081", "--bind", "127.0.0.1")
    assert api.listen == Address("::1", 8080) and str(api.listen) == "[::1]:8080"
    assert api.sleep_policy.memory_reservation == 256 * 2**20
    # min_sleep_time is a floor under the idle timeout.
    assert api.sleep_policy.idle_delay == 90.0


def test_unknown_key_names_file_line_and_path_with_a_hint():
    found = problems(
        """
        services:
          web:
            listen: 127.0.0.1:1
            backend: 127.0.0.1:2
            container: c
            sleep_policy:
              idle_timout: 5
        """
    )
    assert len(found) == 1
    assert found[0].startswith("c.yaml:8: services.web.sleep_policy.idle_timout: unknown key")
    assert "did you mean 'idle_timeout'?" in found[0]


def test_every_fault_is_reported_at_once():
    found = problems(
        """
        services:
          web:
            listen: 127.0.0.1:99999
            backend: nowhere
            container: c
            backlog: lots
            wake_timeout: -1
            sleep_policy: {action: freeze, priority: urgent, enabled: "yes"}
        """
    )
    text = "\n".join(found)
    assert "c.yaml:4: services.web.listen: port must be from 1 to 65535, got 99999" in text
    assert "c.yaml:5: services.web.backend: expected host:port" in text
    assert "c.yaml:7: services.web.backlog: expected a whole number, got 'lots'" in text
    assert "c.yaml:8: services.web.wake_timeout: expected a duration of 0 seconds or more" in text
    assert (
        "services.web.sleep_policy.action: expected one of pause, stop, hibernate, got 'freeze'"
        in text
    )
    assert "services.web.sleep_policy.priority: expected one of low, normal, high" in text
    assert "services.web.sleep_policy.enabled: expected true or false, got 'yes'" in text
    assert len(found) == 7


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "listen: 127.0.0.1:1\nbackend: 127.0.0.1:2",
            "needs 'container' (docker runtime) or 'command'",
        ),
        (
            "listen: 127.0.0.1:1\nbackend: 127.0.0.1:2\ncontainer: c\ncommand: [x]",
            "set either 'container' (docker runtime) or 'command' (process runtime), not both",
        ),
        ("backend: 127.0.0.1:2\ncontainer: c", "needs 'listen'"),
        ("listen: 127.0.0.1:1\ncommand: [x]", "needs 'backend'"),
        ("listen: 127.0.0.1:1\nbackend: 127.0.0.1:1\ncontainer: c", "it would connect to itself"),
        # Before the fix these connected to themselves ~5,000 times a request.
        ("listen: 127.0.0.1:1\nbackend: localhost:1\ncontainer: c", "it would connect to itself"),
        ("listen: 0.0.0.0:1\nbackend: 127.0.0.1:1\ncontainer: c", "it would connect to itself"),
        ("port: 80\ncommand: [x]\nbackend: 127.0.0.1:2", "'port' is the seed form's shorthand"),
        (
            "listen: 127.0.0.1:1\nbackend: 127.0.0.1:2\ncontainer: c\nhttp: {sse_path: /s}",
            "http settings need 'mode: http'",
        ),
        (
            "listen: 127.0.0.1:1\nbackend: 127.0.0.1:2\ncontainer: c\nmode: http\n"
            "http: {idle_connections: allow-sleep}\nsleep_policy: {action: stop}",
            "allow-sleep keeps connections open under a sleeping backend",
        ),
        (
            "listen: 127.0.0.1:1\nbackend: 127.0.0.1:2\ncontainer: c\nmode: http\n"
            "http: {probes: [{method: GET}, {path: healthz}], header_timeout: 0}",
            "needs 'path'",
        ),
        (
            "listen: 127.0.0.1:1\nbackend: 127.0.0.1:2\ncontainer: c\n"
            "sleep_policy: {action: stop, stop_after: 5}",
            "stop_after turns a paused backend into a stopped one",
        ),
        ("listen: 127.0.0.1:1\nbackend: 127.0.0.1:2\ncommand: []", "the command is empty"),
        (
            "listen: 127.0.0.1:1\nbackend: 127.0.0.1:2\ncontainer: c\nreadiness: {http: healthz}",
            "expected a path starting with /",
        ),
        # Once accepted: the error says why it went and what to write instead.
        (
            "listen: 127.0.0.1:1\nbackend: 127.0.0.1:2\ncontainer: c\n"
            "sleep_policy: {action: hibernate, reclaim: pageout}",
            "sleep_policy.reclaim: 'pageout' is no longer offered: it freed no memory",
        ),
    ],
)
def test_cross_field_rules(entry, message):
    body = textwrap.indent(entry, "    ")
    found = problems(f"services:\n  web:\n{body}\n")
    assert any(message in p for p in found), found


def test_duplicate_listen_and_duplicate_keys():
    found = problems(
        """
        services:
          a: {listen: 127.0.0.1:7000, backend: 127.0.0.1:7001, container: a}
          b: {listen: 127.0.0.1:7003, backend: 127.0.0.1:7002, container: b}
          a: {listen: 127.0.0.1:7003, backend: 127.0.0.1:7004, container: a}
        """
    )
    assert any(p.startswith("c.yaml:5: services.a: given twice") for p in found), found
    assert (
        "c.yaml:4: services.b.listen: 127.0.0.1:7003 is already used by services.a.listen" in found
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("0.0.0.0:7000", "127.0.0.1:7000"),
        ("127.0.0.1:7000", "0.0.0.0:7000"),
        ("localhost:7000", "127.0.0.1:7000"),
        ("[::]:7000", "[::1]:7000"),
        ("0.0.0.0:9000", None),  # the admin API's default address
    ],
)
def test_listen_addresses_that_take_the_same_port_clash_in_check(first, second):
    # `run` refuses these at bind time; before the fix `check` passed them.
    entries = [f"a: {{listen: '{first}', backend: 127.0.0.1:7101, container: a}}"]
    if second is not None:
        entries.append(f"b: {{listen: '{second}', backend: 127.0.0.1:7102, container: b}}")
    found = problems("services:\n" + "".join(f"  {entry}\n" for entry in entries))
    owner = "services.a.listen" if second is not None else "admin.listen"
    clash = [p for p in found if "is already used by " + owner in p]
    assert len(clash) == 1 and "the same port" in clash[0], found


def test_listen_addresses_that_share_only_a_port_number_do_not_clash():
    config = parse_yaml(
        textwrap.dedent(
            """
            services:
              a: {listen: '[::]:7000', backend: 127.0.0.1:7101, container: a}
              b: {listen: 127.0.0.1:7000, backend: 127.0.0.1:7102, container: b}
              c: {listen: 0.0.0.0:7001, backend: 10.0.0.5:7001, container: c}
            """
        ),
        "c.yaml",
    )
    assert sorted(config.services) == ["a", "b", "c"]


def test_bad_names_and_shapes():
    assert problems("services: [a, b]")[0] == (
        "c.yaml:1: services: expected a mapping of service names, got ['a', 'b']"
    )
    assert "a service name is 1-63 letters" in problems("services:\n  'bad name': {}\n")[0]
    assert "unknown key 'servics'" in problems("servics: {}\n")[0]
    assert problems("services:\n  a: [\n")[0].startswith("c.yaml:3: not valid YAML")
    assert (
        problems("")[0] == "c.yaml: services: missing: list the services to proxy under 'services:'"
    )


def test_api_style_errors_use_the_key_path_alone():
    with pytest.raises(ConfigError) as info:
        build_config({"services": {"web": {"listen": 5}}})
    assert info.value.problems[0] == (
        "services.web.listen: expected host:port such as 127.0.0.1:8080, got 5"
    )


def test_seed_services_yml_loads_unchanged():
    config = load_config(SEED)
    fs = config.services["filesystem"]
    assert fs.runtime == "docker" and fs.container == "filesystem"
    assert fs.listen == Address("0.0.0.0", 8021)
    assert fs.backend is None and fs.backend_port == 8021  # address read from Docker
    assert fs.auto_start is True
    assert fs.sleep_policy.priority == "high" and not fs.sleep_policy.sleeps
    assert fs.sleep_policy.idle_delay == 600.0
    assert fs.resources.memory == 256_000_000 and fs.resources.cpu == 0.25
    chrome = config.services["chrome-devtools"]
    assert chrome.sleep_policy.sleeps and chrome.sleep_policy.idle_delay == 180.0
    assert chrome.sleep_policy.memory_reservation == 256_000_000
    assert chrome.auto_start is False


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml: cannot read the config file: No such file or directory" in str(info.value)


def test_relative_paths_are_relative_to_the_config_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "config.yaml").write_text(
        textwrap.dedent(
            """
            admin: {listen: 127.0.0.1:9000, token_file: secrets/token}
            prediction: {state_file: state/prediction.json}
            mcp: {state_file: /var/lib/wakeproxy/mcp.json}
            engines:
              far: {host: "tcp://10.0.0.7:2376", cert_path: certs/far}
            services:
              web:
                listen: 127.0.0.1:1
                backend: 127.0.0.1:2
                command: [python3, server.py, --root, www]
                cwd: ../srv
            """
        )
    )
    # Started elsewhere, with the file named relative to there: the same paths.
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/config.yaml")
    assert config.admin.token_file == str(folder / "secrets/token")
    assert config.prediction.state_file == str(folder / "state/prediction.json")
    assert config.mcp.state_file == "/var/lib/wakeproxy/mcp.json"  # absolute: as written
    assert config.engines["far"].cert_path == str(folder / "certs/far")
    web = config.services["web"]
    assert web.cwd == str(folder / "../srv")
    # A command's arguments are not paths: they are read from cwd, as written.
    assert web.command == ("python3", "server.py", "--root", "www")


def test_every_duration_key_has_a_minimum_of_10_ms():
    # Any positive number passed: wake_timeout 1e-9 failed every wake at once, a
    # health_interval or readiness interval of 1e-9 spun a loop. Now at least 0.01 s;
    # where 0 means none or at once, 0 still loads.
    found = problems(
        """
        shutdown: {grace: 1.0e-9}
        discovery: {interval: 1.0e-9}
        prediction: {save_interval: 1.0e-9}
        services:
          web:
            listen: 127.0.0.1:7001
            backend: 127.0.0.1:7002
            command: [x]
            mode: http
            http: {header_timeout: 0.001, inflight_grace: 1.0e-9}
            connect_timeout: 1.0e-9
            idle_connection_timeout: 1.0e-9
            wake_timeout: 1.0e-9
            stop_timeout: 0.005
            readiness: {interval: 1.0e-9}
            sleep_policy:
              idle_timeout: 1.0e-9
              min_sleep_time: 1.0e-9
              stop_after: 1.0e-9
              hibernate_after: 1.0e-9
              predict: {chain_window: 1.0e-9, min_wake_time: 1.0e-9}
          pool:
            listen: 127.0.0.1:7003
            backend: 127.0.0.1:7004
            command: [x, "{port}"]
            replicas: {count: 2, health_interval: 1.0e-9}
        """
    )
    at_least, zero_or = "a duration of at least 0.01 seconds", "0 or a duration of at least 0.01"
    expected = {
        "shutdown.grace": zero_or,
        "discovery.interval": at_least,
        "prediction.save_interval": at_least,
        "services.web.http.header_timeout": at_least,
        "services.web.http.inflight_grace": zero_or,
        "services.web.connect_timeout": at_least,
        "services.web.idle_connection_timeout": zero_or,
        "services.web.wake_timeout": at_least,
        "services.web.stop_timeout": zero_or,
        "services.web.readiness.interval": at_least,
        "services.web.sleep_policy.idle_timeout": at_least,
        "services.web.sleep_policy.min_sleep_time": zero_or,
        "services.web.sleep_policy.stop_after": at_least,
        "services.web.sleep_policy.hibernate_after": zero_or,
        "services.web.sleep_policy.predict": "chain_window: expected " + at_least,
        "services.pool.replicas.health_interval": zero_or,
    }
    for key, why in expected.items():
        assert any(f" {key}: " in p and why in p for p in found), (key, found)
    assert len(found) == len(expected), found
    assert any("wake_timeout: expected a duration of at least 0.01 seconds, got 1e-09" in p
               for p in found)  # fmt: skip
    zeros = build(
        service(
            "web", 7001, 7002, command=["x"], idle_connection_timeout=0, stop_timeout=0,
            wake_timeout=0.01, sleep_policy={"min_sleep_time": 0, "hibernate_after": 0},
        ),
        shutdown={"grace": 0},
    )  # fmt: skip
    assert zeros.services["web"].wake_timeout == 0.01


def test_named_policies_and_their_errors():
    config = parse_yaml(
        textwrap.dedent(
            """
            policies:
              mcp-default: {idle_timeout: 120, action: stop}
            services:
              a: {listen: 127.0.0.1:1, backend: 127.0.0.1:2, container: a,
                  sleep_policy: {use: mcp-default, idle_timeout: 30}}
            """
        ),
        "c.yaml",
    )
    a = config.services["a"]
    assert a.policy == "mcp-default" and a.policy_overrides == {"idle_timeout": 30.0}
    assert a.sleep_policy.idle_timeout == 30.0 and a.sleep_policy.action == "stop"
    found = problems(
        """
        policies:
          p: {idle_timeout: 5}
        services:
          a: {listen: 127.0.0.1:1, backend: 127.0.0.1:2, container: a, sleep_policy: {use: q}}
        """
    )
    assert found == ["c.yaml:5: services.a.sleep_policy.use: no policy named 'q'; defined: p"]


# ---- discovery settings and container labels


def test_discovery_section_and_allowed_listen():
    config = build_config(
        {
            "discovery": {
                "docker_labels": True,
                "allowed_listen": ["127.0.0.0/8:8000-8999", "[::1]:*"],
            }
        }
    )
    assert config.services == {}, "with label discovery on, the file may list no services"
    first, second = config.discovery.allowed_listen
    assert first.allows(Address("127.0.0.2", 8000)) and not first.allows(Address("127.0.0.1", 9000))
    assert not first.allows(Address("0.0.0.0", 8080)), "all addresses is not inside 127/8"
    assert second.allows(Address("::1", 1)) and not second.allows(Address("127.0.0.1", 80))
    with pytest.raises(ConfigError) as bad:
        build_config(
            {"discovery": {"allowed_listen": ["10.0.0.0/8:9-2"], "interval": 0}, "services": {}}
        )
    assert bad.value.problems == [
        "discovery.allowed_listen: the port range '9-2' runs backwards",
        "discovery.interval: expected a duration above 0 seconds, got 0",
    ]
    with pytest.raises(ConfigError, match="missing: list the services"):
        build_config({"discovery": {"docker_labels": False}})


def test_labels_take_the_yaml_keys_and_checks():
    labels = {
        "wakeproxy.enable": "true",
        "wakeproxy.port": "8080",
        "wakeproxy.idle_timeout": "30",
        "wakeproxy.action": "stop",
        "wakeproxy.auto_start": "true",
        "wakeproxy.depends_on": "cache",
        "com.docker.compose.service": "web",
        "com.docker.compose.depends_on": "db:service_started:false,redis:service_healthy:true",
    }
    cfg = service_from_labels(
        "proj-web-1",
        labels,
        policies={},
        allowed_listen=DEFAULT_ALLOWED_LISTEN,
        managed={"web", "db", "cache"},
    )
    assert (cfg.name, cfg.container, cfg.source) == ("web", "proj-web-1", "labels")
    assert cfg.listen == Address("0.0.0.0", 8080) and cfg.backend is None
    assert cfg.backend_port == 8080, "the backend's address is read from Docker"
    assert (cfg.sleep_policy.idle_timeout, cfg.sleep_policy.action) == (30.0, "stop")
    assert cfg.auto_start is True
    assert cfg.depends_on == ("cache", "db"), "compose's redis is not managed: ignored"


def test_labels_take_windows_split_on_semicolons_and_a_predict_mapping():
    cfg = service_from_labels(
        "c1",
        {
            "wakeproxy.enable": "true",
            "wakeproxy.port": "8080",
            "wakeproxy.keep_awake": "mon,wed 08:00-12:00 Europe/Berlin; fri 22:00-02:00",
            "wakeproxy.predict": "{arrivals: true, threshold: 0.6}",
        },
        policies={},
        allowed_listen=DEFAULT_ALLOWED_LISTEN,
    )
    policy = cfg.sleep_policy
    assert [w.text for w in policy.keep_awake] == [
        "mon,wed 08:00-12:00 Europe/Berlin",
        "fri 22:00-02:00",
    ]
    assert policy.predict.arrivals and policy.predict.threshold == 0.6


@pytest.mark.parametrize(
    ("labels", "messages"),
    [
        (
            {"wakeproxy.port": "8080", "wakeproxy.asleep_windows": "sat-sun 25:00-26:00"},
            [
                'container c1: label wakeproxy.asleep_windows: "sat-sun 25:00-26:00": bad '
                "time '25:00'"
            ],
        ),
        (
            {"wakeproxy.port": "8080", "wakeproxy.predict": "arrivals"},
            ["container c1: label wakeproxy.predict: expected a mapping of settings, got"],
        ),
        (
            {"wakeproxy.port": "8080", "wakeproxy.idle_timeout": "soon", "wakeproxy.actoin": "x"},
            [
                "container c1: unknown label 'wakeproxy.actoin' (did you mean 'wakeproxy.action'?)",
                "container c1: label wakeproxy.idle_timeout: expected a duration in seconds",
            ],
        ),
        ({"wakeproxy.idle_timeout": "5"}, ["container c1: needs label wakeproxy.port"]),
        (
            {"wakeproxy.port": "80"},
            ["container c1: label wakeproxy.port: listening on 0.0.0.0:80 is outside"],
        ),
        (
            {"wakeproxy.port": "8080", "wakeproxy.name": "no spaces"},
            ["container c1: a service name is 1-63 letters"],
        ),
        (
            {"wakeproxy.port": "8080", "wakeproxy.policy": "nightly"},
            ["container c1: label wakeproxy.policy: no policy named 'nightly'; defined: none"],
        ),
    ],
)
def test_bad_labels_name_the_container_and_the_label(labels, messages):
    with pytest.raises(ConfigError) as bad:
        service_from_labels(
            "c1",
            {"wakeproxy.enable": "true", **labels},
            policies={},
            allowed_listen=DEFAULT_ALLOWED_LISTEN,
        )
    assert len(bad.value.problems) == len(messages), bad.value.problems
    for problem, message in zip(bad.value.problems, messages, strict=True):
        assert problem.startswith(message), problem


def test_the_readmes_mcp_context_forge_config_loads():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## A first config, in front of mcp-context-forge", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = parse_yaml(block, "README.md")
    filesystem, chrome = config.services["filesystem"], config.services["chrome-devtools"]
    assert filesystem.mode == chrome.mode == "http"
    assert not filesystem.sleep_policy.sleeps and chrome.sleep_policy.sleeps
    assert chrome.http.idle_connections == "allow-sleep" and chrome.listen.port == 8014
    seed = load_config(SEED)
    assert all(s.mode == "http" for s in seed.services.values()), "the seed's form defaults to http"


BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcdef", "bcdefg", strict=True)]
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Seven lines, ten million values expanded: before the bounds 7 s and 1.1 GB.
        (BOMB, "c.yaml:6: over 250000 values once its aliases are expanded"),
        ("a: &a [x, *a]", "c.yaml:1: an alias refers to a node that contains it"),
        ("a: " + "[" * 41 + "]" * 41, "c.yaml:1: nested deeper than 40 levels"),
        ("a: " + "[" * 5000 + "]" * 5000, "c.yaml: nested deeper than 40 levels"),
        ("a: " + "x" * (2 * 1024 * 1024), "c.yaml: the config is over 2 MiB"),
        (
            "services:\n  w:\n    sleep_policy: {memory_reservation: " + "1" * 30 + "}",
            "c.yaml:3: services.w.sleep_policy.memory_reservation: expected a size up to "
            "8 EiB, got a whole number of about 30 digits",
        ),
        (
            "services:\n  w:\n    sleep_policy: {memory_reservation: " + "1" * 400 + "}",
            "c.yaml:3: not valid YAML: a number of over 100 characters",
        ),
        # YAML 1.1 base-60: quadratic to build (2 MiB of it took minutes).
        ("a: " + ":".join(["1"] * 1000), "c.yaml:1: not valid YAML: a number of over 100"),
        ("a: [0x" + "f" * 5000 + "]", "c.yaml:1: not valid YAML: a number of over 100"),
        (
            "services:\n  w:\n    sleep_policy: {memory_reservation: " + "1" * 400 + "MB}",
            "c.yaml:3: services.w.sleep_policy.memory_reservation: expected a size up to 8 EiB",
        ),
        (
            "services:\n  w:\n    wake_timeout: " + "9" * 40,
            "c.yaml:3: services.w.wake_timeout: expected a duration in seconds up to 1e+15",
        ),
        ("a: " + "9" * 5000, "c.yaml:1: not valid YAML: a number of over 100 characters"),
    ],
)
def test_hostile_files_are_bounded_and_named_like_any_fault(text, message):
    found = problems(text)
    assert any(p.startswith(message) for p in found), found


def test_an_oversized_file_is_refused_before_it_is_read_whole(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# " + b"x" * (3 * 1024 * 1024))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: the config is over 2 MiB"]


def test_replica_faults_are_named_each_in_one_pass():
    found = problems(
        """
        services:
          same-port:
            listen: 127.0.0.1:7200
            backend: 127.0.0.1:7201
            command: [python3, -m, http.server, "7201"]
            replicas: {count: 3, max: 4, min: 5}
          twice:
            listen: 127.0.0.1:7210
            backend: 127.0.0.1:7211
            replicas: {containers: [a, b, a]}
          one-container:
            listen: 127.0.0.1:7220
            backend: 127.0.0.1:7221
            container: x
            replicas: {count: 2}
          seed:
            port: 7240
            replicas: {count: 2}
          zero-target:
            listen: 127.0.0.1:7230
            backend: 127.0.0.1:7231
            command: [server, --port, "{port}"]
            group: g
            replicas: {count: 2, target_inflight: 0}
        """
    )
    assert found == [
        "c.yaml:7: services.same-port.replicas: each replica listens on its own port: put "
        "{port} in 'command' or 'env' (replica i gets the backend's port + i)",
        "c.yaml:7: services.same-port.replicas.max: is 4, past the 3 replica(s) there are",
        "c.yaml:7: services.same-port.replicas.min: is 5, past 'max' (4)",
        "c.yaml:11: services.twice.replicas.containers: names the container 'a' twice",
        "c.yaml:16: services.one-container.replicas: replicas of containers are listed in "
        "'containers', one each",
        "c.yaml:19: services.seed.replicas: 'count' copies need a 'command' (containers are "
        "listed in 'containers')",
        "c.yaml:25: services.zero-target.replicas.target_inflight: expected a whole number from 1 "
        "to 1000000, got 0",
    ], found


def test_replicas_expand_to_one_config_each_with_its_port_container_and_name():
    config = build(
        service(
            "web", 7300, 7301, command=["srv", "--port", "{port}", "--id", "{index}"],
            env={"PORT": "{port}"}, replicas={"count": 3, "min": 1}, auto_start=False,
        ),
        service("db", 7310, 7311, command=["db"], depends_on=["web"]),
    )  # fmt: skip
    run = expand_all(config.services.values())
    assert list(run) == ["web@1", "web@2", "web@3", "db"]
    third = run["web@3"]
    assert third.command == ("srv", "--port", "7303", "--id", "3")
    assert third.env == {"PORT": "7303"} and str(third.backend) == "127.0.0.1:7303"
    assert (third.replica_of, third.replica) == ("web", 3)
    # min: the first is started with the proxy and never slept; the others sleep.
    assert run["web@1"].auto_start and not run["web@1"].sleep_policy.enabled
    assert not third.auto_start and third.sleep_policy.enabled
    # A dependency on a service with replicas is one on its oldest replica.
    assert run["db"].depends_on == ("web@1",)
    grouped = build(
        service("web", 7320, 7321, command=["srv", "{port}"], replicas={"count": 2}, group="g"),
    )
    run = expand_all(grouped.services.values())
    assert (run["web@1"].group, run["web@2"].group) == ("g", None), "the oldest stands for it"


def test_compose_replicas_are_that_services_containers_in_the_listing_named_by_number():
    config = build(
        service(
            "tools", 7400,
            replicas={"compose_service": "tools", "compose_project": "p", "port": 8000, "min": 1},
        )
    )  # fmt: skip

    def entry(name: str, project: str, svc: str, number: str) -> dict:
        labels = {COMPOSE_SERVICE: svc, COMPOSE_PROJECT: project, COMPOSE_NUMBER: number}
        return {"Names": [f"/{name}"], "Labels": labels}

    listing = [
        entry("p_tools_2", "p", "tools", "2"),
        entry("p_tools_1", "p", "tools", "1"),
        entry("q_tools_1", "q", "tools", "1"),  # another project's
        entry("p_db_1", "p", "db", "1"),  # another service's
    ]
    run = expand_all(config.services.values(), lambda cfg: compose_members(listing, cfg.replicas))
    assert list(run) == ["tools@1", "tools@2"]
    second = run["tools@2"]
    assert (second.container, second.backend, second.backend_port) == ("p_tools_2", None, 8000)
    assert run["tools@1"].auto_start and not run["tools@1"].sleep_policy.enabled, "min: 1"
    assert not second.auto_start and second.sleep_policy.enabled


def test_engine_faults_name_the_engine_and_the_known_ones():
    found = problems(
        """
        engines:
          far: {host: "tcp://10.0.0.2:2376", cert_path: /etc/wakeproxy/far}
          bad: {host: "10.0.0.3:2375"}
          sock: {host: "unix:///run/other.sock", cert_path: /x}
          none: {tls_verify: false}
        services:
          a: {listen: 127.0.0.1:7500, backend: 127.0.0.1:7501, container: a, engine: farr}
          b: {listen: 127.0.0.1:7502, backend: 127.0.0.1:7503, command: [srv], engine: far}
        """
    )
    assert found == [
        "c.yaml:4: engines.bad.host: expected unix:///path or tcp://HOST:PORT, got '10.0.0.3:2375'",
        "c.yaml:5: engines.sock.cert_path: TLS certificates are for a tcp:// host",
        "c.yaml:6: engines.none: needs 'host' (unix:///path/docker.sock or tcp://HOST:PORT)",
        "c.yaml:8: services.a.engine: no engine 'farr'; engines: far, local",
        "c.yaml:9: services.b.engine: an engine is for containers; a command runs here",
    ], found
    config = build(
        service("a", 7510, 7511, container="a", engine="far"),
        engines={"far": {"host": "tcp://10.0.0.2:2376", "cert_path": "/etc/far"}},
    )
    assert config.services["a"].engine == "far"
    assert config.engines["far"].cert_path == "/etc/far" and config.engines["far"].tls_verify


def test_a_swarm_service_needs_action_stop_and_nothing_else_as_its_backend():
    found = problems(
        """
        services:
          a:
            listen: 127.0.0.1:7600
            backend: 127.0.0.1:7601
            swarm_service: web
            sleep_policy: {action: hibernate}
          b:
            listen: 127.0.0.1:7602
            backend: 127.0.0.1:7603
            swarm_service: web
            container: web
            sleep_policy: {action: stop}
          c: {listen: 127.0.0.1:7604, backend: 127.0.0.1:7605, container: c, swarm_replicas: 2}
        """
    )
    assert found == [
        "c.yaml:7: services.a.sleep_policy.action: a Swarm service sleeps by scaling to 0 "
        "(action: stop) or by pausing its tasks on this engine's node (action: pause); it does "
        "not hibernate",
        "c.yaml:8: services.b: set one of 'swarm_service', 'container' or 'command' (and no "
        "'replicas')",
        "c.yaml:14: services.c.swarm_replicas: is for a 'swarm_service'",
    ], found
    config = build(
        service("web", 7610, 7611, swarm_service="web", swarm_replicas=2,
                sleep_policy={"action": "stop"}),
    )  # fmt: skip
    cfg = config.services["web"]
    assert (cfg.runtime, cfg.swarm_service, cfg.swarm_replicas) == ("swarm", "web", 2)


def test_two_services_on_one_swarm_service_are_refused_on_one_engine_not_on_two():
    found = problems(
        """
        engines: {far: {host: "tcp://10.0.0.2:2375"}}
        services:
          a: {listen: 127.0.0.1:7620, backend: 127.0.0.1:7621, swarm_service: web}
          b: {listen: 127.0.0.1:7622, backend: 127.0.0.1:7623, swarm_service: web}
          c: {listen: 127.0.0.1:7624, backend: 127.0.0.1:7625, swarm_service: web, engine: far}
        """
    )
    assert found == [
        "c.yaml:5: services.b.swarm_service: Swarm service 'web' is already service 'a''s: "
        "one wakeproxy service per Swarm service"
    ], found


def test_prediction_keys_are_refused_on_replicas_and_discovery_engines_must_exist():
    found = problems(
        """
        discovery: {docker_labels: true, engines: [local, far]}
        services:
          pool:
            listen: 127.0.0.1:7630
            backend: 127.0.0.1:7631
            command: ["srv", "{port}"]
            replicas: {count: 2}
            sleep_policy: {keep_awake: ["mon-fri 08:00-18:00"]}
        """
    )
    assert found == [
        "c.yaml:9: services.pool.sleep_policy: keep_awake, asleep_windows and predict are not "
        "for a service with replicas (its replicas follow the load)",
        "c.yaml:2: discovery.engines: no engine 'far'; engines: local",
    ], found


def test_fast_path_is_off_unless_asked_for_and_a_bad_value_is_named():
    config = build(service("web", 1, 2, container="c"), service("fast", 3, 4, command=["x"]))
    assert config.services["web"].fast_path == "off"
    found = problems(
        """\
        services:
          web: {listen: 127.0.0.1:1, backend: 127.0.0.1:2, container: c, fast_path: ebpf}
        """
    )
    assert found == ["c.yaml:2: services.web.fast_path: expected one of off, kernel, got 'ebpf'"], (
        found
    )


def test_check_warns_where_the_fast_path_cannot_apply():
    config = build(
        service("api", 1, 2, command=["x"], fast_path="kernel", mode="http"),
        service("pool", 3, 4, command=["x", "{port}"], fast_path="kernel", replicas={"count": 2}),
        service("plain", 5, 6, command=["x"], fast_path="kernel"),
    )
    _, warnings = preflight(config)
    fast = [w for w in warnings if ".fast_path:" in w]
    assert fast == [
        "services.api.fast_path: mode http: the proxy reads every request; the proxy "
        "forwards every connection",
        "services.pool.fast_path: replicas: the proxy places each connection; the proxy "
        "forwards every connection",
    ], fast


def test_a_plan_from_what_a_source_asked_to_what_it_asks_now():
    from wakeproxy.config.live import plan

    def one(name: str, listen: int, **settings: object) -> ServiceConfig:
        return build(service(name, listen, listen + 1, container=name, **settings)).services[name]

    kept, tuned, moved, gone = (
        one("kept", 1000),
        one("tuned", 1010),
        one("moved", 1020),
        one("gone", 1030),
    )
    before = {s.name: s for s in (kept, tuned, moved, gone)}
    after = {
        "kept": kept,
        "tuned": one("tuned", 1010, sleep_policy={"idle_timeout": 5}),  # a live key
        "moved": one("moved", 1040),  # the listen address: not in place
        "new": one("new", 1050),
        "theirs": one("theirs", 1060),  # runs, but another source's
    }
    running = {"kept", "tuned", "moved", "gone", "theirs"}
    steps = plan(before, after, running)
    assert steps.remove == ("gone",)
    assert [c.name for c in steps.update] == ["tuned"]
    assert [c.name for c in steps.replace] == ["moved"]
    assert [c.name for c in steps.add] == ["new", "theirs"]
    assert steps.unchanged == ("kept",)
    # Asked for before but no longer running (its listener failed): added again; gone
    # from both: nothing to remove.
    steps = plan(before, {"kept": kept}, {"tuned"})
    assert [c.name for c in steps.add] == ["kept"] and steps.remove == ("tuned",)
