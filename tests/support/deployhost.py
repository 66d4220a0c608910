"""A deploy host on real parts, for the deploy tests: its etcd, Debian's docker-registry
on loopback, an edge (reloader + HAProxy) and the sidekick host agent registering the
app containers, started in that order and stopped in the reverse one. The caller's app
containers (and one-offs) are removed at the end whatever happened."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.docker import docker_cmd
from testbed.etcd import Etcd
from testbed.registry import Registry
from testbed.reloader import ReloaderProcess
from testbed.sidekick import Sidekicks


@dataclass
class DeployHost:
    etcd: Etcd
    registry: Registry
    reloader: ReloaderProcess
    sidekicks: Sidekicks


def remove_containers(app: str) -> None:
    for label in ("fluster.app", "fluster.oneoff"):
        ids = docker_cmd("ps", "-aq", "--filter", f"label={label}={app}", check=False)
        if ids.stdout.split():
            docker_cmd("rm", "-f", *ids.stdout.split(), check=False)


@contextlib.contextmanager
def deploy_host(root: Path, app: str) -> Iterator[DeployHost]:
    etcd = Etcd(root / "etcd").start()
    sidekicks = Sidekicks(etcd, root)
    with contextlib.ExitStack() as stack:
        stack.callback(etcd.stop)
        stack.callback(sidekicks.close)
        stack.callback(remove_containers, app)
        registry = Registry(root / "registry").start()
        stack.callback(registry.stop)
        reloader = ReloaderProcess(etcd, root / "reloader").start()
        stack.callback(reloader.stop)
        sidekicks.start("--all", "--node", f"n{app}", "--ttl", "3", "--check-interval", "0.2",
                        "--drain-seconds", "1")  # fmt: skip
        yield DeployHost(etcd, registry, reloader, sidekicks)
