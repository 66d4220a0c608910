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


def _free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((addr, 0))
        return int(sock.getsockname()[1])


class PrivateSwarm(PrivateDockerd):
    """A PrivateDockerd that is a node of a swarm: the manager of its own (`init_swarm`),
    or a worker of another's (`join`), advertising `node_addr` (a loopback address:
    127.0.0.2, ... give further nodes addresses of their own on this one machine)."""

    def __init__(self, root: Path, node_addr: str = "127.0.0.1") -> None:
        super().__init__(root)
        self.gwbridge = "flg" + uuid.uuid4().hex[:8]
        self.node_addr = node_addr
        self.node_id = ""
        self.manager = True

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return docker_cmd(*args, host=self.host, check=check, timeout=timeout).stdout.strip()

    def _make_gwbridge(self) -> None:
        self.docker(
            "network", "create", "--driver", "bridge",
            "--subnet", f"10.253.{random.randint(1, 250)}.0/24",
            "-o", f"com.docker.network.bridge.name={self.gwbridge}",
            "-o", "com.docker.network.bridge.enable_icc=false",
            "-o", "com.docker.network.bridge.enable_ip_masquerade=false",
            "docker_gwbridge",
        )  # fmt: skip

    def _swarm(self, *args: str) -> None:
        last = ""
        for _ in range(5):  # a port picked free can be taken before swarm binds it
            listen = f"{self.node_addr}:{_free_port(self.node_addr)}"
            result = docker_cmd(
                "swarm", *args, "--advertise-addr", self.node_addr, "--listen-addr", listen,
                host=self.host, check=False, timeout=120,
            )  # fmt: skip
            if result.returncode == 0:
                self.node_id = self.docker("info", "--format", "{{.Swarm.NodeID}}")
                return
            last = result.stderr.strip()
        raise AssertionError(
            f"docker swarm {args[0]} failed: {last} (log: {self.root}/dockerd.log)"
        )

    def init_swarm(self) -> None:
        self._make_gwbridge()
        self._swarm("init", "--data-path-port", str(random.randint(20000, 49000)))

    def join(self, manager: PrivateSwarm) -> None:
        """Join `manager`'s swarm as a worker."""
        self.manager = False
        token = manager.docker("swarm", "join-token", "-q", "worker")
        address = manager.docker("info", "--format", "{{(index .Swarm.RemoteManagers 0).Addr}}")
        self._make_gwbridge()
        self._swarm("join", "--token", token, address)

    def crash(self) -> None:
        """The node fails: its engine dies at once (SIGKILL), taking the published ports'
        proxies with it; nothing is stopped or deregistered cleanly."""
        self.kill()

    def services(self) -> list[str]:
        return self.docker("service", "ls", "--format", "{{.Name}}").split()

    def leave(self) -> None:
        """Remove every service (on a manager), leave the swarm, remove docker_gwbridge."""
        if self.proc is None:
            self.start()  # a crashed node: its engine again, to clean up what it left
        if self.manager:
            names = self.docker("service", "ls", "-q", check=False).split()
            if names:
                self.docker("service", "rm", *names, check=False)
            # Tasks stop asynchronously; wait a bounded time so leaving does not race them.
            with contextlib.suppress(AssertionError):  # stop_all removes them by force
                wait_for(
                    lambda: (
                        not self.docker(
                            "ps", "-q", "--filter", "label=com.docker.swarm.task"
                        ).split()
                    ),
                    timeout=60,
                    interval=0.3,
                    what="swarm task containers to stop",
                )
        self.docker("swarm", "leave", "--force", check=False, timeout=60)

    def cleanup(self) -> None:
        try:
            self.leave()
            self.stop_all()
        finally:
            self.remove_bridge()
            subprocess.run(["ip", "link", "del", self.gwbridge], capture_output=True, timeout=10)
            remove_root(self.root)


def start_node(node_addr: str = "127.0.0.1") -> PrivateSwarm:
    """A private dockerd with the base image, not yet in a swarm. The caller cleans up."""
    root = Path(f"/tmp/fl-swarm-{uuid.uuid4().hex[:8]}")  # short: unix socket path limit
    node = PrivateSwarm(root, node_addr)
    try:
        node.make_bridge()
        node.start()
        node.load_base_image()
    except BaseException:
        node.cleanup()
        raise
    return node


@pytest.fixture
def private_swarm(docker_engine: Engine) -> Iterator[PrivateSwarm]:
    """A one-node swarm on its own dockerd, with the base image loaded into it."""
    if os.geteuid() != 0:
        pytest.skip("a second dockerd (and its bridges) can only be started as root")
    swarm = start_node()
    try:
        swarm.init_swarm()
        yield swarm
    finally:
        swarm.cleanup()
