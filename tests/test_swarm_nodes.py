"""A node of a two-node swarm fails: what fluster users see (opt-in: `make e2e-swarm`).

Two dockerds of the test's own on this one machine, joined to one swarm: a manager
advertising 127.0.0.1 and a worker advertising 127.0.0.2 (each with its own roots,
socket, bridges and docker_gwbridge; never the machine's engine). A Swarm node is an
engine, so this is a real two-node swarm; what it does not have is a second kernel, so
Docker-in-Docker nodes would show nothing more for fluster, whose traffic goes to the
nodes' advertise addresses and host-mode ports, not over an overlay. Each node has its
own sidekick host agent; a real reloader + HAProxy is the edge; a request loop runs
through it.

The worker fails (its engine and its sidekick are SIGKILLed, so nothing deregisters):
its record expires with the sidekick's lease and the edge drops it, Swarm marks the node
down and starts the task on the manager, whose sidekick registers it. Failed requests
during the failure are counted and printed, not asserted: which requests fail depends
on timing (HAProxy retries a refused connection on another server). Opt-in because it
starts two engines and waits for Swarm's failure detection.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from fluster.records import Instance
from testbed.load import Load
from tests.support.docker import APP, BASE_IMAGE, Engine
from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import ReloaderProcess
from tests.support.sidekick import Sidekicks
from tests.support.swarm import PrivateSwarm, start_node

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FLUSTER_E2E_SWARM") != "1", reason="opt-in: make e2e-swarm"),
]

TTL = 3


@pytest.fixture
def two_nodes(docker_engine: Engine) -> Iterator[tuple[PrivateSwarm, PrivateSwarm]]:
    if os.geteuid() != 0:
        pytest.skip("private dockerds (and their bridges) can only be started as root")
    manager = start_node("127.0.0.1")
    worker: PrivateSwarm | None = None
    try:
        manager.init_swarm()
        worker = start_node("127.0.0.2")
        worker.join(manager)
        yield manager, worker
    finally:
        if worker is not None:
            worker.cleanup()
        manager.cleanup()


@pytest.mark.timeout(600)
def test_a_failed_node_expires_and_its_task_is_registered_on_another(
    two_nodes: tuple[PrivateSwarm, PrivateSwarm],
    etcd: Etcd,
    sidekicks: Sidekicks,
    start_reloader: Callable[..., ReloaderProcess],
) -> None:
    manager, worker = two_nodes
    reloader = start_reloader()
    tag = uuid.uuid4().hex[:8]
    service = f"s{tag}"
    flags = ("--ttl", str(TTL), "--check-interval", "0.2", "--drain-seconds", "1")
    agents = {
        node.node_addr: sidekicks.start(
            "--all", "--node", f"n{tag}-{i}", *flags, DOCKER_HOST=node.host
        )
        for i, node in enumerate((manager, worker))
    }
    # Host mode, no fixed port; Swarm spreads the two tasks over the two nodes.
    manager.docker(
        "service", "create", "--detach", "--name", service, "--replicas", "2",
        "--no-resolve-image",
        "--restart-condition", "any", "--restart-delay", "1s",
        "--publish", "mode=host,target=8000",
        "--container-label", f"fluster.service={service}",
        "--container-label", "fluster.port=8000",
        "--container-label", "fluster.check=http:/health",
        BASE_IMAGE, "python3", "-c", APP, "8000",
    )  # fmt: skip

    def up_on() -> list[str]:
        found: dict[str, Instance] = sidekicks.instances(service)
        return sorted(i.host for i in found.values() if i.state == "up")

    wait_for(
        lambda: up_on() == ["127.0.0.1", "127.0.0.2"],
        timeout=120,
        interval=0.3,
        what=f"one task registered on each node (saw {up_on()})",
    )
    host = f"{service}.localhost"
    reloader.wait_served(host, {"ok"}, timeout=30)

    with Load(reloader.http_port, host, limit=180) as load:
        time.sleep(1)  # traffic on both nodes before the failure (pacing, not a sync)
        failed_at = time.monotonic()
        worker.crash()
        agents["127.0.0.2"].stop(signal.SIGKILL)

        wait_for(
            lambda: "127.0.0.2" not in up_on(),
            timeout=TTL + 30,
            interval=0.2,
            what=f"the failed node's record to expire (saw {up_on()})",
        )
        expired = time.monotonic() - failed_at
        wait_for(
            lambda: "Down" in manager.docker("node", "ls", "--format", "{{.Status}}"),
            timeout=90,
            interval=0.5,
            what="Swarm to mark the worker down",
        )
        down = time.monotonic() - failed_at
        wait_for(
            lambda: up_on() == ["127.0.0.1", "127.0.0.1"],
            timeout=120,
            interval=0.3,
            what=f"the task rescheduled on the manager and registered (saw {up_on()})",
        )
        recovered = time.monotonic() - failed_at
        reloader.wait_served(host, {"ok"}, timeout=30)
        served_before = sum(load.served.values())
        time.sleep(1)  # a second of traffic after recovery
    assert sum(load.served.values()) > served_before, "no request answered after recovery"
    print(
        f"\nnode failure: record gone after {expired:.1f}s (TTL {TTL}s), node Down after "
        f"{down:.1f}s, task registered on the manager after {recovered:.1f}s; "
        f"{len(load.failures)} of {sum(load.served.values()) + len(load.failures)} requests "
        f"failed: {load.failures[:5]}"
    )
