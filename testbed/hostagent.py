"""Containers registered by one host agent (`sidekick --all`), for the chaos soak's
`agent-kill`: the agent SIGKILLed and started again while its containers serve.

The containers run the base image's `python3 -m http.server` with the `fluster.*` labels
of a service of their own (a unique name: another host agent on the same engine, the
demo's say, must not mix them into its services, nor ours into theirs), published on
127.0.0.1 at a port Docker picks.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

from testbed.docker import BASE_IMAGE, docker_cmd
from testbed.etcd import Etcd
from testbed.servers import Address
from testbed.sidekick import SidekickProcess


def docker_usable() -> bool:
    """The engine answers and has the base image (scripts/base-image.sh builds it)."""
    try:
        return docker_cmd("image", "inspect", BASE_IMAGE, check=False).returncode == 0
    except (OSError, AssertionError):
        return False


class HostAgentGroup:
    def __init__(self, etcd: Etcd, root: Path, ttl: int, size: int = 2) -> None:
        self.etcd, self.root, self.ttl, self.size = etcd, root, ttl, size
        self.service = f"agent{uuid.uuid4().hex[:8]}"
        self.containers: list[str] = []
        self.expected: set[Address] = set()
        self.agent: SidekickProcess | None = None
        self.starts = 0

    def start(self) -> None:
        for _ in range(self.size):
            cid = docker_cmd(
                *("run", "-d", "--label", "fluster.test=1"),
                *("--label", f"fluster.service={self.service}", "--label", "fluster.port=8000"),
                *("--label", "fluster.check=http:/", "-p", "127.0.0.1::8000"),
                *(BASE_IMAGE, "python3", "-m", "http.server", "8000"),
            ).stdout.strip()
            self.containers.append(cid)
            published = docker_cmd("port", cid, "8000/tcp").stdout.split()[0]
            host, _, port = published.rpartition(":")
            self.expected.add((host, int(port)))
        self.start_agent()

    def start_agent(self) -> None:
        self.starts += 1
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SIDEKICK_", "ETCD"))},
            "ETCD_ENDPOINTS": self.etcd.endpoints,
            "SIDEKICK_STATE_DIR": str(self.root / "agent-state"),
        }
        args = [
            *("--all", "--node", "chaos-agent", "--ttl", str(self.ttl)),
            *("--check-interval", "0.5", "--rise", "1", "--fall", "2", "--drain-seconds", "1"),
        ]
        self.agent = SidekickProcess(args, env, self.root / f"agent{self.starts}.log")

    def kill_agent(self) -> None:
        """SIGKILL: nothing drains, its records stay until its lease runs out or the next
        agent registers the same containers again."""
        assert self.agent is not None
        os.killpg(self.agent.proc.pid, signal.SIGKILL)
        self.agent.proc.wait(10)
        self.start_agent()

    def close(self) -> None:
        if self.agent is not None and self.agent.proc.poll() is None:
            os.killpg(self.agent.proc.pid, signal.SIGKILL)
            self.agent.proc.wait(10)
        if self.containers:
            docker_cmd("rm", "-f", *self.containers, check=False)
        self.containers.clear()
