"""A single-node Docker Swarm for tests, on a dockerd of its own.

Never the machine's engine: `docker swarm init` there would change what every other test
and engineer on the machine sees. The swarm's engine is a `PrivateDockerd` (own socket,
data and exec roots, pidfile, bridge, no iptables), and everything Swarm itself makes on
the host is made unique too:

- `docker_gwbridge`, the bridge Swarm attaches its ingress sandbox to, is created before
  `swarm init` with a Linux bridge name and subnet of its own (Docker's documented way to
  customise it), so it neither takes nor collides with a `docker_gwbridge` of another
  engine;
- the manager listens on a loopback port picked free, and VXLAN on a random data-path
  port, so two test runs (or a real swarm) never share one;
- the advertise address is 127.0.0.1: host-mode published ports of tasks are then reached
  on loopback, which is where the node's sidekick registers them.

Swarm's ingress routing mesh needs iptables, which this engine does not touch; fluster
does not use it (HAProxy reaches tasks at their host-mode ports), so nothing is missing.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.docker import Engine, PrivateDockerd, docker_cmd, remove_root
from tests.support.etcd import wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateSwarm(PrivateDockerd):
    """A PrivateDockerd that is the one manager of its own swarm."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gwbridge = "flg" + uuid.uuid4().hex[:8]
        self.node_addr = "127.0.0.1"
        self.node_id = ""

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return docker_cmd(*args, host=self.host, check=check, timeout=timeout).stdout.strip()

    def init_swarm(self) -> None:
        self.docker(
            "network",
            "create",
            "--driver",
            "bridge",
            "--subnet",
            f"10.253.{random.randint(1, 250)}.0/24",
            "-o",
            f"com.docker.network.bridge.name={self.gwbridge}",
            "-o",
            "com.docker.network.bridge.enable_icc=false",
            "-o",
            "com.docker.network.bridge.enable_ip_masquerade=false",
            "docker_gwbridge",
        )
        last = ""
        for _ in range(5):  # a port picked free can be taken before swarm binds it
            result = docker_cmd(
                "swarm",
                "init",
                "--advertise-addr",
                self.node_addr,
                "--listen-addr",
                f"127.0.0.1:{_free_port()}",
                "--data-path-port",
                str(random.randint(20000, 49000)),
                host=self.host,
                check=False,
                timeout=120,
            )
            if result.returncode == 0:
                break
            last = result.stderr.strip()
        else:
            raise AssertionError(f"docker swarm init failed: {last} (log: {self.root}/dockerd.log)")
        self.node_id = self.docker("info", "--format", "{{.Swarm.NodeID}}")

    def service_tasks(self, service: str) -> list[str]:
        """Current states of the service's tasks that should be running."""
        out = self.docker(
            "service", "ps", service, "--filter", "desired-state=running", "--format",
            "{{.CurrentState}}", check=False,
        )  # fmt: skip
        return [line for line in out.splitlines() if line]

    def services(self) -> list[str]:
        return self.docker("service", "ls", "--format", "{{.Name}}").split()

    def leave(self) -> None:
        """Remove every service, leave the swarm, remove docker_gwbridge (and its bridge)."""
        if self.proc is None:
            return
        names = self.docker("service", "ls", "-q", check=False).split()
        if names:
            self.docker("service", "rm", *names, check=False)
        # Tasks stop asynchronously; wait a bounded time so leaving does not race them.
        with contextlib.suppress(AssertionError):  # stop_all removes them by force
            wait_for(
                lambda: (
                    not self.docker("ps", "-q", "--filter", "label=com.docker.swarm.task").split()
                ),
                timeout=60,
                interval=0.3,
                what="swarm task containers to stop",
            )
        self.docker("swarm", "leave", "--force", check=False, timeout=60)


@pytest.fixture
def private_swarm(docker_engine: Engine) -> Iterator[PrivateSwarm]:
    """A one-node swarm on its own dockerd, with the base image loaded into it."""
    if os.geteuid() != 0:
        pytest.skip("a second dockerd (and its bridges) can only be started as root")
    root = Path(f"/tmp/fl-swarm-{uuid.uuid4().hex[:8]}")  # short: unix socket path limit
    swarm = PrivateSwarm(root)
    try:
        swarm.make_bridge()
        swarm.start()
        swarm.init_swarm()
        swarm.load_base_image()
        yield swarm
    finally:
        try:
            swarm.leave()
            swarm.stop_all()
        finally:
            swarm.remove_bridge()
            subprocess.run(["ip", "link", "del", swarm.gwbridge], capture_output=True, timeout=10)
            remove_root(root)
