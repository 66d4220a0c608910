"""The sidekick's Docker modes against a real Docker engine and a real etcd.

Each test uses its own service and node names: other sidekicks (and other people's
labelled containers) may share the engine, and must not confuse the assertions.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

from tests.support.docker import Engine, PrivateDockerd
from tests.support.etcd import Etcd, wait_for
from tests.support.sidekick import Sidekicks

COMMON = ("--ttl", "2", "--check-interval", "0.2")


def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"s{tag}", f"n{tag}"


def test_companion_registers_the_published_port_and_drains_on_stop(
    sidekicks: Sidekicks, apps: Engine
) -> None:
    service, node = names()
    cid = apps.run_app(8000)
    proc = sidekicks.start(
        "--container",
        cid[:12],
        "--service",
        service,
        "--port",
        "8000",
        "--node",
        node,
        "--check",
        "http:/health",
        "--drain-seconds",
        "2",
        "--app-version",
        "v1",
        *COMMON,
    )
    name = f"{node}-{cid[:12]}"
    inst = wait_for(lambda: sidekicks.instances(service).get(name), what="registration")
    assert (inst.host, inst.port) == ("127.0.0.1", apps.host_port(cid))
    assert (inst.version, inst.node, inst.state) == ("v1", node, "up")
    wait_for(lambda: proc.check().returncode == 0, what="--check ok")

    stopped = time.time()
    apps.docker("stop", "-t", "10", cid)
    wait_for(lambda: name not in sidekicks.instances(service), what="deregistration")
    assert proc.logged_at("deregistered") - stopped <= 2 + 1
    assert proc.logged("draining")
    # The companion follows its container: started again, registered again (new port).
    apps.docker("start", cid)
    inst = wait_for(lambda: sidekicks.instances(service).get(name), what="registered again")
    assert inst.port == apps.host_port(cid)


def test_host_agent_follows_run_and_rm(sidekicks: Sidekicks, apps: Engine) -> None:
    service, node = names()
    agent = sidekicks.start("--all", "--node", node, "--drain-seconds", "1", *COMMON)
    labels = {
        "fluster.service": service,
        "fluster.port": "8000",
        "fluster.version": "v7",
        "fluster.weight": "50",
        "fluster.tags.zone": "a",
        "fluster.check": "http:/",
    }
    first = apps.run_app(8000, labels=labels)
    second = apps.run_app(8000, labels=labels)
    unlabelled = apps.run_app(8000)
    want = {f"{node}-{c[:12]}": apps.host_port(c) for c in (first, second)}
    wait_for(
        lambda: {n: i.port for n, i in sidekicks.instances(service).items()} == want,
        what="both containers registered",
    )
    inst = sidekicks.instances(service)[f"{node}-{first[:12]}"]
    assert (inst.version, inst.weight, dict(inst.tags)) == ("v7", 50, {"zone": "a"})
    assert not any(unlabelled[:12] in n for n in sidekicks.instances(service))

    removed = time.time()
    apps.docker("rm", "-f", first)
    wait_for(
        lambda: set(sidekicks.instances(service)) == {f"{node}-{second[:12]}"},
        what="removed container deregistered",
    )
    assert agent.logged_at("deregistered") - removed < 2
    # A paused container answers nothing: out while paused, back when unpaused.
    apps.docker("pause", second)
    wait_for(lambda: not sidekicks.instances(service), timeout=3, what="paused: deregistered")
    apps.docker("unpause", second)
    wait_for(
        lambda: set(sidekicks.instances(service)) == {f"{node}-{second[:12]}"},
        what="unpaused: registered again",
    )


def test_docker_healthcheck_gates_registration(sidekicks: Sidekicks, apps: Engine) -> None:
    service, node = names()
    sidekicks.start(
        "--all", "--node", node, "--drain-seconds", "0.5", "--rise", "1", "--fall", "1", *COMMON
    )
    cid = apps.run_app(
        8000,
        labels={"fluster.service": service},
        extra=(
            "--health-cmd",
            "test ! -e /tmp/sick",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ),
    )
    name = f"{node}-{cid[:12]}"
    # No fluster.check label: the image's HEALTHCHECK is used ("auto").
    wait_for(lambda: name in sidekicks.instances(service), timeout=15, what="healthy")
    apps.docker("exec", cid, "touch", "/tmp/sick")
    wait_for(lambda: name not in sidekicks.instances(service), timeout=15, what="unhealthy")
    apps.docker("exec", cid, "rm", "/tmp/sick")
    wait_for(lambda: name in sidekicks.instances(service), timeout=15, what="healthy again")


def test_host_agent_restart_removes_records_of_vanished_containers(
    sidekicks: Sidekicks, apps: Engine, etcd: Etcd
) -> None:
    service, node = names()
    labels = {"fluster.service": service, "fluster.port": "8000"}
    keep, gone = apps.run_app(8000, labels=labels), apps.run_app(8000, labels=labels)
    agent = sidekicks.start("--all", "--node", node, "--ttl", "60")
    wait_for(lambda: len(sidekicks.instances(service)) == 2, what="both registered")
    agent.stop(signal.SIGKILL)  # its leases (60 s) outlive it: the records stay
    apps.docker("rm", "-f", gone)
    # A record of this node for a container that never existed here, and one of another node.
    prefix = f"/fluster/services/{service}/instances/"
    etcd.put(
        prefix + f"{node}-0123456789ab", json.dumps({"host": "10.0.0.1", "port": 1, "node": node})
    )
    etcd.put(
        prefix + "other-0123456789ab", json.dumps({"host": "10.0.0.2", "port": 1, "node": "other"})
    )
    sidekicks.start("--all", "--node", node, "--ttl", "60")
    want = {f"{node}-{keep[:12]}", "other-0123456789ab"}
    wait_for(
        lambda: set(sidekicks.instances(service)) == want,
        timeout=10,
        what="zombies removed, the rest kept",
    )


def test_retired_container_is_stopped_with_on_retire_stop(
    sidekicks: Sidekicks, apps: Engine, etcd: Etcd
) -> None:
    service, node = names()
    cid = apps.run_app(8000)
    sidekicks.start(
        "--container",
        cid,
        "--service",
        service,
        "--port",
        "8000",
        "--node",
        node,
        "--app-version",
        "v1",
        "--on-retire",
        "stop",
        "--drain-seconds",
        "0.5",
        *COMMON,
    )
    name = f"{node}-{cid[:12]}"
    wait_for(lambda: name in sidekicks.instances(service), what="registration")
    # A v2 instance up, or the edge would fall back to v1 and v1 would not retire.
    v2 = '{"host": "127.0.0.1", "port": 8082, "version": "v2"}'
    etcd.put(f"/fluster/services/{service}/instances/other-v2", v2)
    etcd.put(f"/fluster/services/{service}/spec", '{"active_version": "v2", "history": ["v1"]}')
    wait_for(lambda: name not in sidekicks.instances(service), timeout=5, what="deregistered")
    wait_for(lambda: not apps.running(cid), timeout=15, what="container stopped")


def test_dockerd_restart_resyncs_without_zombies(
    sidekicks: Sidekicks, private_dockerd: PrivateDockerd
) -> None:
    service, node = names()
    engine = Engine(private_dockerd.host)

    def labels(port: int) -> dict[str, str]:
        return {"fluster.service": service, "fluster.port": str(port)}

    try:
        a, port_a = engine.run_host_app(labels)
        b, port_b = engine.run_host_app(labels, extra=("--restart", "always"))
        sidekicks.start(
            "--all",
            "--node",
            node,
            "--docker-host",
            private_dockerd.host,
            "--advertise-ip",
            "127.0.0.1",
            "--drain-seconds",
            "0.5",
            *COMMON,
        )
        name_a, name_b = f"{node}-{a[:12]}", f"{node}-{b[:12]}"
        wait_for(
            lambda: (
                {n: i.port for n, i in sidekicks.instances(service).items()}
                == {name_a: port_a, name_b: port_b}
            ),
            what="both registered",
        )

        # dockerd dies without a word; A's process dies while nobody is watching.
        pid_a = int(engine.docker("inspect", "-f", "{{.State.Pid}}", a))
        private_dockerd.kill()
        os.kill(pid_a, signal.SIGKILL)
        time.sleep(3)  # longer than the TTL: the sidekick must keep both leases alive
        assert set(sidekicks.instances(service)) == {name_a, name_b}

        private_dockerd.start()
        wait_for(
            lambda: set(sidekicks.instances(service)) == {name_b},
            timeout=20,
            what="A deregistered at resync, B kept",
        )
        wait_for(lambda: engine.running(b), timeout=20, what="B running again")
        wait_for(lambda: name_b in sidekicks.instances(service), timeout=10, what="B registered")
    finally:
        engine.cleanup()


def test_internal_registers_the_container_ip(sidekicks: Sidekicks, apps: Engine) -> None:
    service, node = names()
    sidekicks.start("--all", "--internal", "--node", node, *COMMON)
    cid = apps.run_app(
        8000,
        publish=False,
        labels={
            "fluster.service": service,
            "fluster.port": "8000",
            "fluster.check": "http:/health",
        },
    )
    networks = apps.inspect(cid)["NetworkSettings"]
    assert isinstance(networks, dict)
    ip = next(iter(networks["Networks"].values()))["IPAddress"]
    inst = wait_for(
        lambda: sidekicks.instances(service).get(f"{node}-{cid[:12]}"),
        what="registered (healthy via the container IP)",
    )
    assert (inst.host, inst.port) == (ip, 8000)


def test_companion_started_before_its_container(sidekicks: Sidekicks, apps: Engine) -> None:
    service, node = names()
    container = f"fluster-test-{uuid.uuid4().hex[:10]}"
    proc = sidekicks.start(
        "--container", container, "--service", service, "--port", "8000", "--node", node, *COMMON
    )
    wait_for(lambda: proc.logged("sidekick starting"), what="sidekick running")
    cid = apps.run_app(8000, name=container)
    inst = wait_for(
        lambda: sidekicks.instances(service).get(f"{node}-{cid[:12]}"),
        what="registered once the container started",
    )
    assert inst.port == apps.host_port(cid)
