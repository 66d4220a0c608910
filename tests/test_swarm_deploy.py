"""`fluster deploy` with the Swarm scheduler, end to end on real parts.

A one-node swarm on a dockerd of the test's own (tests/support/swarm.py; never the
machine's engine), Debian's docker-registry on loopback that the swarm pulls from, real
etcd, a real reloader with HAProxy, the real sidekick host agent on the swarm's engine,
and `fluster deploy --git` building on that engine. v1 then v2 are deployed under a
bounded request loop through HAProxy; every failed request is kept and must be none.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deployer.engine import Engine
from deployer.swarm import SwarmScheduler
from testbed.load import Load
from tests.support.etcd import Etcd, wait_for
from tests.support.gitapp import APP, COLOR_APP, DOCKERFILE, IDENTITY
from tests.support.haproxy import ReloaderProcess
from tests.support.registry import Registry
from tests.support.sidekick import SidekickProcess, Sidekicks
from tests.support.swarm import PrivateSwarm

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FLUSTER = str(Path(sys.executable).with_name("fluster"))
CRASH = 'print("cannot start: no database", flush=True)\nraise SystemExit(3)\n'


class Deploys:
    def __init__(self, swarm: PrivateSwarm, etcd: Etcd, registry: Registry, root: Path) -> None:
        self.swarm, self.root = swarm, root
        self.app = f"w{uuid.uuid4().hex[:8]}"
        self.work = root / "work"
        self.work.mkdir()
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "DOCKER_HOST"},
            **IDENTITY,
            "ETCD_ENDPOINTS": etcd.endpoints,
            "FLUSTER_REGISTRY": registry.address,
            "FLUSTER_REPOS": str(root / "repos"),
            "DOCKER_HOST": swarm.host,
        }

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, capture_output=True, text=True, env=self.env, cwd=self.work, timeout=timeout
        )

    def fluster(self, *args: str) -> str:
        out = self.run(FLUSTER, *args)
        assert out.returncode == 0, f"fluster {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def commit(self, mark: str, app: str = "") -> str:
        (self.work / "app.py").write_text(app or APP.format(mark=mark, sick=False))
        (self.work / "Dockerfile").write_text(DOCKERFILE.format(extra=""))
        for args in (("add", "-A"), ("commit", "-q", "-m", f"app {mark}")):
            assert self.run("git", *args).returncode == 0
        return self.run("git", "rev-parse", "HEAD").stdout.strip()

    def deploy(self, mark: str) -> str:
        sha = self.commit(mark)
        self.fluster("deploy", self.app, "--git", str(self.work), "--ref", "main")
        return sha

    def services(self) -> dict[str, int]:
        """version -> replicas of every Swarm service of the app."""
        out = self.swarm.docker(
            "service", "ls", "--filter", f"label=fluster.app={self.app}", "-q"
        ).split()
        found = {}
        for sid in out:
            spec = json.loads(self.swarm.docker("service", "inspect", sid))[0]["Spec"]
            found[spec["Labels"]["fluster.version"]] = spec["Mode"]["Replicated"]["Replicas"]
        return found

    def running_tasks(self, version: str) -> int:
        return len(
            self.swarm.docker(
                "ps", "-q", "--filter", f"label=fluster.app={self.app}",
                "--filter", f"label=fluster.version={version}",
            ).split()
        )  # fmt: skip


@dataclass
class SwarmHost:
    """A deploy host whose apps run on the private swarm: its registry, an edge, the
    swarm node's sidekick host agent, and an app (`d.app`, scheduler swarm) to deploy."""

    d: Deploys
    reloader: ReloaderProcess
    registry: Registry
    sidekick: SidekickProcess

    def create(self, *extra: str) -> None:
        self.d.fluster(
            "app", "create", self.d.app, "--replicas", "2", "--health-timeout", "90",
            "--drain-seconds", "1", "--keep-old", "1h", "--scheduler", "swarm", *extra,
        )  # fmt: skip
        assert self.d.run("git", "init", "-q", "-b", "main").returncode == 0


@pytest.fixture
def swarm_host(
    private_swarm: PrivateSwarm, etcd: Etcd, sidekicks: Sidekicks, tmp_path: Path
) -> Iterator[SwarmHost]:
    registry = Registry(tmp_path / "registry").start()
    reloader = ReloaderProcess(etcd, tmp_path / "reloader").start()
    try:
        d = Deploys(private_swarm, etcd, registry, tmp_path)
        sidekick = sidekicks.start(
            "--all", "--node", f"n{d.app}", "--ttl", "3", "--check-interval", "0.2",
            "--drain-seconds", "1", DOCKER_HOST=private_swarm.host,
        )  # fmt: skip
        yield SwarmHost(d, reloader, registry, sidekick)
    finally:
        reloader.stop()
        registry.stop()


@pytest.mark.timeout(600)  # a private dockerd and a swarm to set up first
def test_swarm_deploys_v2_beside_v1_promotes_retires_and_rolls_back(
    private_swarm: PrivateSwarm, swarm_host: SwarmHost
) -> None:
    d, reloader, registry, sidekick = (
        swarm_host.d, swarm_host.reloader, swarm_host.registry, swarm_host.sidekick
    )  # fmt: skip
    swarm_host.create()
    host = f"{d.app}.localhost"

    v1 = d.deploy("v1")[:12]
    reloader.wait_served(host, {"v1"}, timeout=60)
    # One Swarm service per version, named {app}-{sha7}, with the app's replicas,
    # its image from the registry.
    assert d.services() == {v1: 2}
    name = private_swarm.docker("service", "ls", "--filter", f"label=fluster.app={d.app}",
                                "--format", "{{.Name}} {{.Image}}")  # fmt: skip
    assert name == f"{d.app}-{v1[:7]} {registry.address}/{d.app}:{v1}"
    assert v1 in registry.tags(d.app)

    # A version that crashes at start: the gate sees its failed task at once, the
    # deploy fails with the app's output, its service is removed, v1 serves on.
    with Load(reloader.http_port, host) as load:
        d.commit("crash", app=CRASH)
        out = d.run(FLUSTER, "deploy", d.app, "--git", str(d.work), "--ref", "main")
    assert out.returncode != 0, out.stdout
    assert "cannot start: no database" in out.stdout + out.stderr, out.stdout + out.stderr
    assert d.services() == {v1: 2}
    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:10]}"
    assert set(load.served) == {"v1"}, load.served

    with Load(reloader.http_port, host) as load:
        v2 = d.deploy("v2")[:12]
        reloader.wait_served(host, {"v2"}, timeout=30)
    assert load.served["v2"] > 0, load.served
    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:10]}"
    # Retired: v1's service is at 0 (kept for a rollback), its tasks are gone.
    assert d.services() == {v1: 0, v2: 2}
    wait_for(lambda: d.running_tasks(v1) == 0, timeout=60, what="v1 tasks stopped")

    with Load(reloader.http_port, host) as load:
        d.fluster("rollback", d.app)
        reloader.wait_served(host, {"v1"}, timeout=30)
    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:10]}"
    assert d.services() == {v1: 2, v2: 0}

    # v2 deployed again (its commit once more): its service at 0 is scaled up,
    # not created a second time.
    with Load(reloader.http_port, host) as load:
        d.fluster("deploy", d.app, "--git", str(d.work), "--ref", v2)
        reloader.wait_served(host, {"v2"}, timeout=30)
    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:10]}"
    assert d.services() == {v1: 0, v2: 2}
    assert sidekick.proc.poll() is None, sidekick.log()

    # Past the keep-old window: the scheduler removes the services at 0 replicas of
    # versions not kept, never one that runs.
    removed = asyncio.run(remove_stopped(private_swarm.host, d.app, keep=set()))
    assert removed == 1
    assert d.services() == {v2: 2}
    reloader.wait_served(host, {"v2"})


@pytest.mark.timeout(600)
def test_day_two_on_swarm_config_scale_logs_and_rollback_to_a_release(
    swarm_host: SwarmHost,
) -> None:
    """The day-2 commands with the Swarm scheduler: a config change is a new service of
    the same image, scale sets the service's replicas, logs come through the manager,
    and a rollback to v1 brings its config back; under load, none fails a request."""
    d, reloader = swarm_host.d, swarm_host.reloader
    swarm_host.create("--env", "COLOR=red")
    host = f"{d.app}.localhost"
    d.commit("one", app=COLOR_APP.format(mark="one"))
    d.fluster("deploy", d.app, "--git", str(d.work), "--ref", "main")
    reloader.wait_served(host, {"one red"}, timeout=60)

    with Load(reloader.http_port, host) as load:
        wait_for(lambda: load.served["one red"] > 20, what="load running on one red")
        d.fluster("app", "config", d.app, "--env", "COLOR=blue")
        reloader.wait_served(host, {"one blue"}, timeout=30)
    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:10]}"
    releases = json.loads(d.fluster("releases", d.app, "--json"))
    assert [(r["release"], r["kind"]) for r in releases] == [("v1", "deploy"), ("v2", "config")]
    v1, v2 = releases[0]["version"], releases[1]["version"]
    assert d.services() == {v1: 0, v2: 2}

    d.fluster("scale", d.app, "3")
    assert d.services() == {v1: 0, v2: 3}
    wait_for(lambda: d.running_tasks(v2) == 3, timeout=60, what="3 tasks of v2")
    logs = d.fluster("logs", d.app, "--tail", "20")
    assert logs.count("app one starting with COLOR=blue") >= 3, logs
    assert all(line.startswith("v2 ") for line in logs.splitlines()), logs

    with Load(reloader.http_port, host) as load:
        wait_for(lambda: load.served["one blue"] > 20, what="load running on one blue")
        d.fluster("rollback", d.app, "--to", "v1")
        reloader.wait_served(host, {"one red"}, timeout=30)
    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:10]}"
    assert d.services() == {v1: 3, v2: 0}  # the app's replicas now: 3


async def remove_stopped(docker_host: str, app: str, keep: set[str]) -> int:
    async with Engine(docker_host) as engine:
        return await SwarmScheduler(engine).remove(app, keep.__contains__)
