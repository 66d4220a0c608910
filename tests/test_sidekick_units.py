"""The sidekick's pure parts: settings, health hysteresis, planning, events, status."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fluster.docker import Container, EngineInfo, parse_event
from fluster.settings import SettingsError
from sidekick import status
from sidekick.health import CheckSpec, HealthGate, parse_check
from sidekick.plan import PlanError, image_version, node_name, plan_container, plan_static
from sidekick.settings import Settings, build

ENV: dict[str, str] = {}


def settings(*argv: str, **env: str) -> Settings:
    return build(list(argv), env)[0]


def test_every_bad_option_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as err:
        build(
            [
                "--container",
                "web1",
                "--ttl",
                "0",
                "--check",
                "ftp",
                "--weight",
                "999",
                "--service",
                "Bad_Name",
                "--tag",
                "novalue",
            ],
            ENV,
        )
    text = str(err.value)
    for needle in ("--port is required", "--ttl", "--check", "--weight", "--service", "--tag"):
        assert needle in text


def test_cli_exits_2_on_bad_settings_and_has_help_and_version() -> None:
    run = [sys.executable, "-m", "sidekick.cli"]
    bad = subprocess.run([*run, "--all", "--ttl", "x"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "--ttl" in bad.stderr
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    assert "SIDEKICK_TTL" in helped.stdout
    assert "fluster.service" in helped.stdout
    version = subprocess.run([*run, "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("sidekick ")


def test_environment_variables_and_flags() -> None:
    s = settings(
        SIDEKICK_ALL="1",
        SIDEKICK_TTL="7",
        SIDEKICK_CHECK="http:/health",
        SIDEKICK_TAGS="zone=a,rack=3",
        ETCD_ENDPOINTS="10.0.0.1:2379,10.0.0.2:2379",
    )
    assert (s.mode, s.ttl, s.check, dict(s.tags)) == (
        "all",
        7,
        CheckSpec("http", "/health"),
        {"zone": "a", "rack": "3"},
    )
    assert s.etcd.endpoints == ("10.0.0.1:2379", "10.0.0.2:2379")
    assert settings("--ttl", "9", SIDEKICK_ALL="1", SIDEKICK_TTL="7").ttl == 9  # flag wins


def test_bare_check_asks_for_status_and_a_value_chooses_the_health_check() -> None:
    assert build(["--check"], {"SIDEKICK_ALL": "1"})[1] is True
    s, status_check = build(["--all", "--check", "tcp"], ENV)
    assert (status_check, s.check) == (False, CheckSpec("tcp"))
    assert build(["--check"], {"SIDEKICK_CHECK": "tcp", "SIDEKICK_ALL": "1"})[1] is True


def test_parse_check() -> None:
    assert parse_check("http:/health?deep=1") == CheckSpec("http", "/health?deep=1")
    assert parse_check("http") == CheckSpec("http", "/")
    assert parse_check("docker") == CheckSpec("docker")
    for bad in ("http:health", "http:/a b", "udp", ""):
        with pytest.raises(ValueError, match=r"want|path"):
            parse_check(bad)


def test_health_gate_rise_fall_and_flapping() -> None:
    gate = HealthGate(rise=2, fall=3)
    assert [gate.observe(ok) for ok in (True, True)] == [None, True]
    # Flapping below the fall count never deregisters.
    assert [gate.observe(ok) for ok in (False, False, True, False, True)] == [None] * 5
    assert gate.healthy
    assert [gate.observe(ok) for ok in (False, False, False)] == [None, None, False]
    assert [gate.observe(ok) for ok in (True, False, True, True)] == [None, None, None, True]


def container(**changes: object) -> Container:
    base: dict[str, object] = {
        "id": "0123456789abcdef" * 4,
        "name": "web1",
        "running": True,
        "image": "registry.local:5000/web:3f2a9c1",
        "labels": {"fluster.service": "web", "fluster.port": "8000"},
        "ports": {"8000/tcp": (("0.0.0.0", 49153), ("::", 49153))},
        "networks": {"bridge": "172.17.0.5"},
    }
    return Container(**{**base, **changes})  # type: ignore[arg-type]


def test_plan_uses_the_published_port_and_the_advertise_ip() -> None:
    s = settings("--all")
    plan = plan_container(container(), s, "hosta", "10.1.2.3")
    assert (plan.service, plan.name) == ("web", "hosta-0123456789ab")
    assert (plan.instance.host, plan.instance.port, plan.instance.version) == (
        "10.1.2.3",
        49153,
        "3f2a9c1",
    )
    assert plan.check == CheckSpec("none")
    pinned = container(ports={"8000/tcp": (("127.0.0.1", 32768),)})
    assert plan_container(pinned, s, "h", "10.1.2.3").instance.address == "127.0.0.1:32768"
    advertised = settings("--all", "--advertise-ip", "192.0.2.7")
    assert plan_container(pinned, advertised, "h", "10.1.2.3").instance.host == "192.0.2.7"


def test_plan_internal_host_network_and_errors() -> None:
    internal = plan_container(container(), settings("--all", "--internal"), "h", "10.0.0.9")
    assert internal.instance.address == "172.17.0.5:8000"
    host = plan_container(
        container(network_mode="host", ports={}), settings("--all"), "h", "10.0.0.9"
    )
    assert host.instance.address == "10.0.0.9:8000"
    with pytest.raises(PlanError, match="not published"):
        plan_container(container(ports={}), settings("--all"), "h", "10.0.0.9")
    with pytest.raises(PlanError, match=r"fluster\.port"):
        plan_container(
            container(labels={"fluster.service": "web"}, ports={"80/tcp": (), "443/tcp": ()}),
            settings("--all"),
            "h",
            "10.0.0.9",
        )


def test_labels_win_for_the_agent_and_flags_for_a_companion() -> None:
    labels = {
        "fluster.service": "web",
        "fluster.port": "8000",
        "fluster.version": "v2",
        "fluster.weight": "30",
        "fluster.check": "tcp",
        "fluster.tags.zone": "b",
    }
    c = container(labels=labels, health="healthy")
    agent = plan_container(
        c, settings("--all", "--app-version", "v9", "--tag", "zone=a"), "h", "10.0.0.1"
    )
    assert (agent.instance.version, agent.instance.weight, agent.check) == (
        "v2",
        30,
        CheckSpec("tcp"),
    )
    assert dict(agent.instance.tags) == {"zone": "b"}
    companion = plan_container(
        c,
        settings(
            "--container",
            "web1",
            "--service",
            "api",
            "--port",
            "8000",
            "--app-version",
            "v9",
            "--tag",
            "zone=a",
            "--instance",
            "api-1",
        ),
        "h",
        "10.0.0.1",
    )
    assert (companion.service, companion.name, companion.instance.version) == ("api", "api-1", "v9")
    assert dict(companion.instance.tags) == {"zone": "a"}
    assert plan_container(
        container(health="starting"), settings("--all"), "h", "1.2.3.4"
    ).check == CheckSpec("docker")


def test_plan_static_and_names() -> None:
    plan = plan_static(settings("--service", "web", "--address", "[::1]:8080"), "h")
    assert (plan.name, plan.instance.address) == ("h---1-8080", "[::1]:8080")
    assert node_name("my host!") == "my-host"
    assert image_version("web:latest") == image_version("web") == ""
    assert image_version("localhost:5000/web") == ""
    assert image_version("web:v1.2@sha256:abc") == "v1.2"


def test_parse_event() -> None:
    raw = {
        "Type": "container",
        "Action": "health_status: healthy",
        "Actor": {
            "ID": "abc",
            "Attributes": {"name": "web1", "image": "x", "fluster.service": "web"},
        },
    }
    event = parse_event(raw)
    assert event is not None
    assert event.status == "healthy"
    assert (event.action, event.id, event.name, dict(event.labels)) == (
        "health_status",
        "abc",
        "web1",
        {"fluster.service": "web"},
    )
    kill = parse_event(
        {
            "Type": "container",
            "Action": "kill",
            "Actor": {"ID": "abc", "Attributes": {"signal": "15"}},
        }
    )
    assert kill is not None
    assert kill.signal == 15
    assert parse_event({"Type": "network", "Action": "connect"}) is None
    assert parse_event({"Type": "container", "Action": "exec_start: sh"}) is None


def test_status_check(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    assert status.check(path, 10)[0] is False
    entry = {"service": "web", "instance": "h-1", "current": True}
    path.write_text(json.dumps({"at": time.time(), "registrations": [entry]}))
    assert status.check(path, 10) == (True, "ok: 1 registration(s) current")
    path.write_text(json.dumps({"at": time.time(), "registrations": [{**entry, "current": False}]}))
    assert status.check(path, 10) == (False, "not registered in etcd: web/h-1")
    path.write_text(json.dumps({"at": time.time() - 60, "registrations": []}))
    assert status.check(path, 10)[0] is False


def test_engine_info_advertises_the_swarm_address_only_on_an_active_node() -> None:
    swarm = {"Name": "node-a", "Swarm": {"LocalNodeState": "active", "NodeAddr": "10.0.0.21"}}
    assert EngineInfo.from_info(swarm) == EngineInfo("node-a", "10.0.0.21")
    left = {"Name": "node-a", "Swarm": {"LocalNodeState": "inactive", "NodeAddr": ""}}
    assert EngineInfo.from_info(left) == EngineInfo("node-a", "")
    assert EngineInfo.from_info({"Name": "node-a"}) == EngineInfo("node-a", "")


def test_an_instance_records_when_its_container_started() -> None:
    data = {
        "Id": "0123456789abcdef" * 4,
        "Name": "/web1",
        "State": {"Running": True, "StartedAt": "2026-11-30T18:06:41.123456789Z"},
        "Config": {"Image": "web:v1", "Labels": {"fluster.service": "web"}},
        "NetworkSettings": {"Ports": {"8000/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49153"}]}},
    }
    c = Container.from_inspect(data)
    assert c.started_at == "2026-11-30T18:06:41Z"
    plan = plan_container(c, settings("--all"), "h", "10.0.0.9")
    assert plan.instance.since == "2026-11-30T18:06:41+00:00"
    never = Container.from_inspect({**data, "State": {"StartedAt": "0001-01-01T00:00:00Z"}})
    assert never.started_at == ""


def test_only_labels_set_on_the_container_count() -> None:
    """Docker shows an image's labels as the container's: one whose value is the image's
    is the image's, whoever set it, and is left out."""
    from sidekick.plan import own_labels

    image = {"fluster.service": "bank", "fluster.port": "8000", "maintainer": "x"}
    merged = {**image, "fluster.port": "9000", "fluster.app": "web"}
    own, inherited = own_labels(merged, image)
    assert own == {"fluster.port": "9000", "fluster.app": "web", "maintainer": "x"}
    assert inherited == ["fluster.service"]
    assert own_labels(image, {}) == (image, [])
