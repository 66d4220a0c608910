"""`git push` deploys end to end, on real parts only.

Real git over real ssh (Debian's sshd on a loopback port, the deploy key forced to
`fluster git-shell`), the app's pre-receive hook running `fluster deploy`, the real Docker
engine building on the locally made base image, Debian's docker-registry on loopback, a
real sidekick host agent registering the containers, a real reloader with HAProxy routing
them, and a bounded request loop through HAProxy counting every failure.

One registry, etcd, reloader, sidekick and sshd serve the whole module, and the tests run
in order on one app: v1 is deployed once by the fixture, each test pushes from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.load import Load
from tests.support.docker import Engine, docker_cmd
from tests.support.etcd import Etcd, wait_for
from tests.support.gitapp import APP, DOCKERFILE, IDENTITY
from tests.support.haproxy import ReloaderProcess
from tests.support.registry import Registry
from tests.support.sidekick import Sidekicks
from tests.support.sshd import Sshd

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FLUSTER = str(Path(sys.executable).with_name("fluster"))


@dataclass
class World:
    etcd: Etcd
    registry: Registry
    reloader: ReloaderProcess
    sshd: Sshd
    engine: Engine
    root: Path
    app: str
    repos: Path
    remote: str
    work: Path
    versions: dict[str, str] = field(default_factory=dict)  # mark -> deployed version

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ETCD_ENDPOINTS": self.etcd.endpoints,
            "FLUSTER_REGISTRY": self.registry.address,
            "FLUSTER_REPOS": str(self.repos),
        }

    def fluster(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FLUSTER, *args], capture_output=True, text=True, env=self.env, timeout=timeout
        )

    def git(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=cwd or self.work,
            capture_output=True,
            text=True,
            env={**self.sshd.git_env(), **IDENTITY},
            timeout=300,
        )

    @property
    def bare(self) -> str:
        """The app's repository as a local path: the deploy key may only push, not fetch."""
        return str(self.repos / f"{self.app}.git")

    def commit(
        self, mark: str, *, sick: bool = False, extra: str = "", cwd: Path | None = None
    ) -> str:
        where = cwd or self.work
        (where / "app.py").write_text(APP.format(mark=mark, sick=sick))
        (where / "Dockerfile").write_text(DOCKERFILE.format(extra=extra))
        for args in (("add", "-A"), ("commit", "-q", "-m", f"app {mark}")):
            out = self.git(*args, cwd=where)
            assert out.returncode == 0, out.stderr
        return self.git("rev-parse", "HEAD", cwd=where).stdout.strip()

    def build_image(self, mark: str) -> str:
        """An image of the app answering `mark`, built here without git (the caller removes it)."""
        build = self.root / f"image-{mark}"
        build.mkdir()
        (build / "app.py").write_text(APP.format(mark=mark, sick=False))
        (build / "Dockerfile").write_text(DOCKERFILE.format(extra=""))
        image = f"fluster-test-{self.app}:{mark}"
        self.engine.docker("build", "-q", "-t", image, str(build), timeout=300)
        return image

    def push(self, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.git("push", "origin", "HEAD:main", cwd=cwd)

    def containers(self, version: str, *, running: bool = True) -> list[str]:
        args = ["ps", "-q", "--filter", f"label=fluster.app={self.app}"]
        args += ["--filter", f"label=fluster.version={version}"]
        return self.engine.docker(*args, *([] if running else ["-a"])).split()

    def active(self) -> str | None:
        out = self.fluster("ls", self.app, "--json").stdout
        import json

        spec = json.loads(out)["services"].get(self.app, {}).get("spec", {}) if out else {}
        return spec.get("active_version")

    def served(self, timeout: float = 30) -> str:
        """Wait until one body answers alone through HAProxy; return it."""

        def alone() -> str | None:
            bodies = self.reloader.served_by(f"{self.app}.localhost", 6)
            return next(iter(bodies)) if len(bodies) == 1 else None

        return str(wait_for(alone, timeout=timeout, interval=0.2, what="one version serving"))


@pytest.fixture(scope="module")
def world(docker_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if os.geteuid() != 0:
        pytest.skip("the ssh deploy path starts sshd, which needs root here")
    root = tmp_path_factory.mktemp("gitdeploy")
    app = f"d{uuid.uuid4().hex[:8]}"
    etcd = Etcd(root / "etcd").start()
    registry = reloader = sshd = None
    sidekicks = Sidekicks(etcd, root)
    engine = Engine(docker_engine.host)
    try:
        registry = Registry(root / "registry").start()
        reloader = ReloaderProcess(etcd, root / "reloader").start()
        sidekicks.start("--all", "--node", f"n{app}", "--ttl", "3", "--check-interval", "0.2",
                        "--drain-seconds", "1")  # fmt: skip
        repos = root / "repos"
        sshd = Sshd(root / "sshd").start(f"{FLUSTER} git-shell --repos {repos}")
        work = root / "work"
        world = World(etcd, registry, reloader, sshd, engine, root, app, repos, "", work)
        created = world.fluster(
            "app", "create", app, "--replicas", "2", "--health-timeout", "30",
            "--drain-seconds", "1", "--keep-old", "1h", "--ssh-host", "127.0.0.1",
            "--ssh-port", str(sshd.port),
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        remote = next(line.split()[-1] for line in created.stdout.splitlines() if "ssh://" in line)
        assert remote == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{repos}/{app}.git"
        world.remote = remote
        work.mkdir()
        for args in (("init", "-q", "-b", "main"), ("remote", "add", "origin", remote)):
            assert world.git(*args).returncode == 0
        world.commit("v1")
        pushed = world.push()
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        assert world.served(60) == "v1"
        world.versions["v1"] = str(world.active())
        yield world
    finally:
        ids = docker_cmd("ps", "-aq", "--filter", f"label=fluster.app={app}", check=False)
        if ids.stdout.split():
            docker_cmd("rm", "-f", *ids.stdout.split(), check=False)
        sidekicks.close()
        for part in (sshd, reloader, registry):
            if part is not None:
                part.stop()
        etcd.stop()


def test_push_v2_over_ssh_serves_alone_without_a_failed_request(world: World) -> None:
    v1 = world.versions["v1"]
    sha = world.commit("v2")
    with Load(world.reloader.http_port, f"{world.app}.localhost") as load:
        wait_for(lambda: load.served["v1"] > 20, what="load running on v1")
        pushed = world.push()
        after_push = load.only()
        time.sleep(0.5)  # let the loop send a few more requests after the push returned
    output = pushed.stdout + pushed.stderr
    assert pushed.returncode == 0, output
    for stage in ("build", "push", "start", "healthy", "promote", "retire"):
        assert f"remote: -----> {stage}: done" in output, output
    assert "fork" not in output, "gRPC's fork warnings reached the user"
    v2 = sha[:12]
    world.versions["v2"] = v2
    assert world.active() == v2
    assert after_push == {"v2"}, f"answers right after the push: {after_push}"
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}"
    assert load.served["v2"] > 0
    assert world.containers(v1) == [], "v1 containers still running"
    assert len(world.containers(v1, running=False)) == 2, "v1 containers kept for a rollback"
    assert len(world.containers(v2)) == 2
    assert v2 in world.registry.tags(world.app)


def test_failing_health_check_rejects_the_push_and_v2_keeps_serving(world: World) -> None:
    before = world.served()
    active = world.active()
    sha = world.commit("v3-sick", sick=True)
    world.fluster("app", "config", world.app, "--health-timeout", "8")
    try:
        with Load(world.reloader.http_port, f"{world.app}.localhost") as load:
            pushed = world.push()
    finally:
        world.fluster("app", "config", world.app, "--health-timeout", "30")
        world.git("reset", "-q", "--hard", "HEAD~1")
    output = pushed.stdout + pushed.stderr
    assert pushed.returncode != 0, output
    assert "health check failed on purpose (v3-sick)" in output, output
    assert "healthy: FAILED" in output
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}"
    assert set(load.served) == {before}
    assert world.active() == active
    assert world.containers(sha[:12], running=False) == [], "a v3 container was left"
    listed = world.fluster("deploys", world.app)
    assert "failed" in listed.stdout.splitlines()[-3] + listed.stdout, listed.stdout


def test_failing_dockerfile_rejects_the_push_with_the_build_error(world: World) -> None:
    before = world.served()
    sha = world.commit("v4-broken", extra='RUN echo "compiling the frobnicator" && exit 3\n')
    try:
        with Load(world.reloader.http_port, f"{world.app}.localhost") as load:
            pushed = world.push()
    finally:
        world.git("reset", "-q", "--hard", "HEAD~1")
    output = pushed.stdout + pushed.stderr
    assert pushed.returncode != 0, output
    assert "remote:        compiling the frobnicator" in output, output
    assert "build: FAILED" in output and "returned a non-zero code: 3" in output, output
    assert load.failures == []
    assert set(load.served) == {before}
    assert world.containers(sha[:12], running=False) == []


def test_two_pushes_at_once_are_serialized(world: World) -> None:
    """Two developers push main at the same moment. The hooks take turns on the app's lock:
    one deploys; the other waits ("waiting for deploy ... to finish"), then finds main moved
    under it and is refused without deploying, as git itself would refuse its ref update.
    Its developer fetches, merges and pushes again, and that deploys too."""
    other = world.root / "other"
    assert world.git("clone", "-q", world.bare, str(other), cwd=world.root).returncode == 0
    assert world.git("remote", "set-url", "origin", world.remote, cwd=other).returncode == 0
    mine = world.commit("v5-mine")
    theirs = world.commit("v5-theirs", cwd=other)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def push(name: str, cwd: Path) -> None:
        results[name] = world.push(cwd)

    threads = [
        threading.Thread(target=push, args=("mine", world.work)),
        threading.Thread(target=push, args=("theirs", other)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    won = [name for name, r in results.items() if r.returncode == 0]
    assert len(won) == 1, "\n\n".join(f"{n}: {r.stdout}{r.stderr}" for n, r in results.items())
    lost = "theirs" if won == ["mine"] else "mine"
    lost_output = results[lost].stdout + results[lost].stderr
    assert "waiting for deploy" in lost_output, lost_output
    assert "moved to" in lost_output, lost_output
    winner, loser = (mine, theirs) if won == ["mine"] else (theirs, mine)
    assert world.active() == winner[:12]
    assert world.containers(loser[:12], running=False) == []
    # The loser catches up and deploys.
    where = other if lost == "theirs" else world.work
    for args in (("fetch", "-q", world.bare, "main"), ("reset", "-q", "--hard", "FETCH_HEAD")):
        assert world.git(*args, cwd=where).returncode == 0
    world.commit("v6", cwd=where)  # their change again, on top of the winner's
    again = world.push(where)
    assert again.returncode == 0, again.stdout + again.stderr
    head = world.git("rev-parse", "HEAD", cwd=where).stdout.strip()
    assert world.active() == head[:12]
    if lost == "mine":
        for args in (("fetch", "-q", world.bare, "main"), ("reset", "-q", "--hard", "FETCH_HEAD")):
            assert world.git(*args).returncode == 0
    world.versions["v5"] = head[:12]


def test_rollback_brings_the_previous_version_back_without_a_build(world: World) -> None:
    current = world.active()
    assert current is not None
    before = world.served()
    with Load(world.reloader.http_port, f"{world.app}.localhost") as load:
        rolled = world.fluster("rollback", world.app)
        after = load.only()
    output = rolled.stdout + rolled.stderr
    assert rolled.returncode == 0, output
    assert "build" not in output and "push" not in output, output
    previous = world.active()
    assert previous not in (None, current)
    assert after == {world.served()} and after != {before}
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}"
    assert world.containers(current) == []
    assert len(world.containers(str(previous))) == 2
    history = world.fluster("deploys", world.app).stdout
    assert "rollback" in history


def test_deploy_an_image_without_git_no_promote_then_promote(world: World) -> None:
    """`fluster deploy APP --image IMAGE` takes an image built elsewhere (no git); with
    --no-promote it stops once the new version is healthy, beside the serving one, and a
    second deploy of the same image promotes the containers already running."""
    before = world.served()
    image = world.build_image("img")
    try:
        with Load(world.reloader.http_port, f"{world.app}.localhost") as load:
            staged = world.fluster("deploy", world.app, "--image", image, "--no-promote")
            assert staged.returncode == 0, staged.stdout + staged.stderr
            assert "not promoted" in staged.stdout
            version = world.engine.docker("image", "inspect", "-f", "{{.Id}}", image)[7:19]
            assert world.active() != version
            assert len(world.containers(version)) == 2
            promoted = world.fluster("deploy", world.app, "--image", image)
            assert promoted.returncode == 0, promoted.stdout + promoted.stderr
            assert "already running" in promoted.stdout
            after = load.only()
    finally:
        world.engine.docker("rmi", image, check=False)
    assert world.active() == version
    assert after == {"img"}
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}"
    assert "img" in load.served and before in load.served
    assert version in world.registry.tags(world.app)


def test_canary_sends_a_share_and_waits_for_the_promotion(world: World) -> None:
    before = world.served()
    active = world.active()
    image = world.build_image("canary")
    try:
        deployed = world.fluster("deploy", world.app, "--image", image, "--canary", "50")
    finally:
        world.engine.docker("rmi", image, check=False)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "canary: done" in deployed.stdout and "promote" not in deployed.stdout.split("canary")[0]
    version = deployed.stdout.split(": deploying ", 1)[1].split()[0]
    assert world.active() == active
    both = {before, "canary"}
    wait_for(
        lambda: world.reloader.served_by(f"{world.app}.localhost", 20) == both,
        timeout=20,
        what=f"both {sorted(both)} answering",
    )
    listed = world.fluster("deploys", world.app).stdout
    assert "waiting" in listed.splitlines()[-1] or "waiting" in listed
    promoted = world.fluster("promote", world.app, version)
    assert promoted.returncode == 0, promoted.stderr
    assert world.served() == "canary"


def test_a_push_of_another_branch_is_accepted_and_not_deployed(world: World) -> None:
    active = world.active()
    world.commit("feature")
    try:
        pushed = world.git("push", "origin", "HEAD:feature")
    finally:
        world.git("reset", "-q", "--hard", "HEAD~1")
    assert pushed.returncode == 0, pushed.stderr
    assert "accepted, not deployed (a push of main deploys)" in pushed.stderr, pushed.stderr
    assert world.active() == active


def test_gc_removes_the_stopped_containers_of_versions_no_longer_routed(world: World) -> None:
    def listing() -> list[tuple[str, str]]:
        out = world.engine.docker(
            "ps", "-a", "--filter", f"label=fluster.app={world.app}",
            "--format", '{{.Label "fluster.version"}} {{.State}}',
        )  # fmt: skip
        return [tuple(line.split()) for line in out.splitlines()]  # type: ignore[misc]

    active = world.active()
    before = listing()
    assert any(state != "running" for _, state in before), before
    running_before = sorted(v for v, state in before if state == "running")
    gc = world.fluster("gc", world.app, "--force")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert "stopped instance(s) of versions no longer routed" in gc.stdout
    after = listing()
    assert [v for v, state in after if state != "running" and v != active] == [], after
    assert sorted(v for v, state in after if state == "running") == running_before
    assert world.served() == "canary"


def test_ssh_key_allows_nothing_but_a_push_to_an_app(world: World) -> None:
    shell = world.sshd.ssh("id")
    assert shell.returncode != 0
    assert "refused" in shell.stderr and "uid=" not in shell.stdout
    clone = world.git("clone", "-q", world.remote, str(world.root / "clone"), cwd=world.root)
    assert clone.returncode != 0 and "refused" in clone.stderr, clone.stderr
    missing = world.remote.replace(world.app, "nosuchapp")
    pushed = world.git("push", missing, "HEAD:main")
    assert pushed.returncode != 0 and "no app 'nosuchapp'" in pushed.stderr, pushed.stderr
    outside = world.git("push", world.remote.replace(str(world.repos), "/tmp"), "HEAD:main")
    assert outside.returncode != 0 and "refused" in outside.stderr, outside.stderr
