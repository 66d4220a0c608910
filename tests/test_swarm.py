"""fluster on a real Docker Swarm: a one-node swarm on a dockerd of the test's own
(tests/support/swarm.py), real etcd, the real sidekick host agent.

What one node can show of a swarm: Swarm tasks registered by the node's sidekick at
their host-mode published ports and the node's advertise address, deregistered when
scaled away, and a killed task replaced by Swarm and registered again. Several nodes
(node failure, rescheduling elsewhere) are described in docs/DEPLOYING.md.
"""

from __future__ import annotations

import urllib.request
import uuid

import pytest

from fluster.records import Instance
from tests.support.docker import APP, BASE_IMAGE
from tests.support.etcd import wait_for
from tests.support.sidekick import Sidekicks
from tests.support.swarm import PrivateSwarm
from tests.support.waiting import Compared

pytestmark = pytest.mark.slow


def create_app_service(
    swarm: PrivateSwarm, name: str, service: str, version: str, replicas: int
) -> None:
    """The test app as a Swarm service, labelled the way the swarm scheduler labels one."""
    swarm.docker(
        "service", "create", "--detach", "--name", name, "--replicas", str(replicas),
        "--no-resolve-image", "--restart-condition", "any", "--restart-delay", "1s",
        "--publish", "mode=host,target=8000",
        "--container-label", f"fluster.service={service}",
        "--container-label", "fluster.port=8000",
        "--container-label", f"fluster.version={version}",
        "--container-label", "fluster.check=http:/health",
        "--stop-grace-period", "5s",
        BASE_IMAGE, "python3", "-c", APP, "8000",
    )  # fmt: skip


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
        return str(resp.read().decode())


@pytest.mark.timeout(300)  # a private dockerd and a swarm to set up first
def test_host_agent_registers_swarm_tasks_at_the_node_advertise_address(
    private_swarm: PrivateSwarm, sidekicks: Sidekicks
) -> None:
    tag = uuid.uuid4().hex[:8]
    service, node = f"s{tag}", f"n{tag}"
    proc = sidekicks.start(
        "--all", "--node", node, "--ttl", "2", "--check-interval", "0.2",
        "--drain-seconds", "1", DOCKER_HOST=private_swarm.host,
    )  # fmt: skip
    create_app_service(private_swarm, f"{service}-v1", service, "v1", 2)

    def two_up() -> dict[str, Instance] | None:
        found = sidekicks.instances(service)
        up = {k: v for k, v in found.items() if v.state == "up"}
        return up if len(up) == 2 else None

    def published() -> set[int]:
        """The IPv4 host ports of the running tasks, as the sidekick registers them. Docker
        20.10 may give one container's IPv6 binding (`:::32768->8000/tcp`) another port
        than its IPv4 one when the first was taken in one family only: not a task."""
        return {
            int(line.rpartition(":")[2].partition("-")[0])
            for line in private_swarm.docker(
                "ps", "--filter", f"label=com.docker.swarm.service.name={service}-v1",
                "--format", "{{.Ports}}",
            ).replace(", ", "\n").splitlines()
            if line.strip() and not line.strip().startswith((":::", "[::"))
        }  # fmt: skip

    # Swarm may replace a task that failed to start (say its random host port was taken
    # meanwhile): wait until what is registered is what runs, both sides read together.
    def registered_as_running() -> dict[str, Instance] | Compared | None:
        up = two_up()
        if up is None:
            return None
        ports = Compared("registered vs running ports", {i.port for i in up.values()}, published())
        return up if ports else ports

    instances = wait_for(
        registered_as_running,
        timeout=120,
        interval=0.3,
        what=f"2 tasks registered at their published ports ({proc.log_path})",
    )
    # The swarm advertises 127.0.0.1; no --advertise-ip was given: the sidekick took it
    # from the engine, not from the default route.
    assert {(i.host, i.version, i.node) for i in instances.values()} == {("127.0.0.1", "v1", node)}
    for inst in instances.values():
        assert get(inst.port) == "ok"
    assert proc.logged("advertising the swarm node address")

    # A task that dies is replaced by Swarm (restart policy), and the replacement is
    # registered while the dead one's record goes: what a user sees on one node of a
    # node failure, too.
    victim = next(iter(instances))
    cid = victim.rpartition("-")[2]
    private_swarm.docker("kill", cid)
    wait_for(
        lambda: (found := two_up()) is not None and victim not in found,
        timeout=120,
        interval=0.3,
        what=f"the killed task replaced and registered ({proc.log_path})",
    )

    # Scaled to 0: every task drains and deregisters.
    private_swarm.docker("service", "scale", "--detach", f"{service}-v1=0")
    wait_for(
        lambda: not sidekicks.instances(service),
        timeout=60,
        interval=0.3,
        what=f"scaled-away tasks deregistered ({proc.log_path})",
    )
