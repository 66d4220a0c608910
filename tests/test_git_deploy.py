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

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.docker import BASE_IMAGE
from testbed.load import Load
from tests.support.deployhost import deploy_host
from tests.support.docker import Engine
from tests.support.etcd import Etcd, wait_for
from tests.support.faults import TcpProxy
from tests.support.gitapp import APP, DOCKERFILE, IDENTITY
from tests.support.haproxy import ReloaderProcess
from tests.support.registry import Registry
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

    def git(
        self, *args: str, cwd: Path | None = None, key: str = "client_ed25519"
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=cwd or self.work,
            capture_output=True,
            text=True,
            env={**self.sshd.git_env(key), **IDENTITY},
            timeout=300,
        )

    def add_key(self, app: str, name: str, key: str) -> subprocess.CompletedProcess[str]:
        """`fluster app keys add`: the ssh key `key` (made if new) may push `app`."""
        return self.fluster(
            "app", "keys", "add", app, "--name", name, "--key", str(self.sshd.client_key(key)),
            "--authorized-keys", str(self.sshd.authorized_keys),
        )  # fmt: skip

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

    def records(self, version: str) -> list[dict[str, str]]:
        """The deploy records of `version`, oldest first (`fluster deploys --json`)."""
        records = json.loads(self.fluster("deploys", self.app, "--json").stdout)
        return [r for r in records if r.get("version") == version]

    def stage_names(self, version: str) -> list[str]:
        """The stages the deploys of `version` have begun, as recorded."""
        return [str(s["name"]) for r in self.records(version) for s in r.get("stages", [])]

    def wait_started(self, version: str, what: str) -> None:
        """Until the app's `replicas` (2) containers of `version` run."""
        wait_for(lambda: len(self.containers(version)) == 2, timeout=120, what=what)

    def sync(self) -> None:
        """The work tree at the deployed branch (an earlier test may have pushed from a
        clone of its own)."""
        for args in (("fetch", "-q", self.bare, "main"), ("reset", "-q", "--hard", "FETCH_HEAD")):
            out = self.git(*args)
            assert out.returncode == 0, out.stderr

    def sidekick_log(self) -> str:
        """The host agent's log (JSON lines)."""
        return (self.root / "sidekick0.log").read_text()

    def push_refused(self) -> str:
        """Push HEAD, a commit made to be refused, then take it back; the push's output."""
        try:
            pushed = self.push()
        finally:
            self.git("reset", "-q", "--hard", "HEAD~1")
        output = pushed.stdout + pushed.stderr
        assert pushed.returncode != 0, f"the push was not refused:\n{output}"
        return output

    def push(self, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.git("push", "origin", "HEAD:main", cwd=cwd)

    def containers(self, version: str, *, running: bool = True) -> list[str]:
        args = ["ps", "-q", "--filter", f"label=fluster.app={self.app}"]
        args += ["--filter", f"label=fluster.version={version}"]
        return self.engine.docker(*args, *([] if running else ["-a"])).split()

    def active(self) -> str | None:
        out = self.fluster("ls", self.app, "--json").stdout
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
    engine = Engine(docker_engine.host)
    with deploy_host(root, app) as host, contextlib.ExitStack() as stack:
        sshd = Sshd(root / "sshd").start(None)  # the keys come from `fluster app keys add`
        stack.callback(sshd.stop)
        repos = root / "repos"
        work = root / "work"
        world = World(
            host.etcd, host.registry, host.reloader, sshd, engine, root, app, repos, "", work
        )
        created = world.fluster(
            "app", "create", app, "--replicas", "2", "--health-timeout", "30",
            "--drain-seconds", "1", "--keep-old", "1h", "--ssh-host", "127.0.0.1",
            "--ssh-port", str(sshd.port),
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        added = world.add_key(app, "dev", "client_ed25519")
        assert added.returncode == 0, added.stderr
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
    for stage in ("build", "push", "start", "healthy", "promote"):
        assert f"remote: -----> {stage}: done" in output, output
    assert "retires in the background" in output, output  # the push returned once served
    assert "fork" not in output, "gRPC's fork warnings reached the user"
    v2 = sha[:12]
    world.versions["v2"] = v2
    assert world.active() == v2
    assert after_push == {"v2"}, f"answers right after the push: {after_push}"
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}"
    assert load.served["v2"] > 0
    wait_for(lambda: "retire" in world.stage_names(v2), timeout=30, what="v2's retire stage")
    wait_for(lambda: world.containers(v1) == [], timeout=30, what="v1 containers stopped")
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
    assert pushed.returncode != 0 and "may not push nosuchapp" in pushed.stderr, pushed.stderr
    outside = world.git("push", world.remote.replace(str(world.repos), "/tmp"), "HEAD:main")
    assert outside.returncode != 0 and "refused" in outside.stderr, outside.stderr


# -- trust: what a push, an image or a key can reach (docs/SECURITY.md) -------------------


def test_a_key_pushes_only_its_own_apps(world: World) -> None:
    """A second developer's key, granted another app only, can neither push this app nor
    read its refs; the key that pushed is recorded as who deployed."""
    other = f"z{world.app}"
    granted = world.add_key(other, "intruder", "intruder_ed25519")
    assert granted.returncode == 0, granted.stderr
    listed = world.fluster(
        "app", "keys", "ls", world.app, "--authorized-keys", str(world.sshd.authorized_keys)
    )
    assert "dev" in listed.stdout and "intruder" not in listed.stdout, listed.stdout
    pushed = world.git("push", world.remote, "HEAD:main", key="intruder_ed25519")
    assert pushed.returncode != 0, pushed.stdout + pushed.stderr
    assert f"this key may not push {world.app}" in pushed.stderr, pushed.stderr
    refs = world.git("ls-remote", world.remote, key="intruder_ed25519")
    assert refs.returncode != 0 and str(world.active()) not in refs.stdout, refs.stdout
    records = json.loads(world.fluster("deploys", world.app, "--json").stdout)
    pushes = [r for r in records if r.get("branch")]
    assert pushes and pushes[-1]["by"] == "key dev", pushes[-1:]


BUILD_PUT = """\
RUN python3 -c "import base64, json, sys, urllib.request; \\
b = lambda s: base64.b64encode(s.encode()).decode(); \\
body = json.dumps({{'key': b('/trust-probe'), 'value': b('{value}')}}).encode(); \\
urllib.request.urlopen('http://{endpoint}/v3/kv/put', body, timeout=5); \\
print('WROTE', 'ETCD')" || (echo COULD NOT "REACH" ETCD && exit 7)
"""


def test_a_build_step_cannot_reach_etcd(world: World) -> None:
    """etcd listening on the host's bridge address, as a deploy host without TLS would
    have it: a container on Docker's bridge writes to it (the path is open), a RUN step
    of a push does not (builds run without a network), and the push fails saying so.
    (The markers are printed from split words: the build also echoes each RUN line.)"""
    world.sync()
    gateway = world.engine.docker(
        "network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}"
    ).strip()
    host, port = world.etcd.endpoints.split(",")[0].rsplit(":", 1)
    proxy = TcpProxy((host, int(port)), bind=gateway)
    script = BUILD_PUT.format(value="from-a-container", endpoint=proxy.endpoint)
    probe = script.removeprefix("RUN ").split(" || ")[0].replace("\\\n", "")
    try:
        reached = world.engine.docker(
            "run", "--rm", "--network", "bridge", BASE_IMAGE, "sh", "-c", probe, timeout=60
        )
        assert "WROTE ETCD" in reached, reached
        assert world.etcd.get("/trust-probe") == "from-a-container"
        before = world.served()
        sha = world.commit("v-etcd", extra=BUILD_PUT.format(value="from-a-build",
                                                             endpoint=proxy.endpoint))  # fmt: skip
        with Load(world.reloader.http_port, f"{world.app}.localhost") as load:
            output = world.push_refused()
    finally:
        proxy.close()
    assert "COULD NOT REACH ETCD" in output and "WROTE ETCD" not in output, output
    assert world.etcd.get("/trust-probe") == "from-a-container"
    assert load.failures == [] and set(load.served) == {before}, load.failures[:5]
    assert world.containers(sha[:12], running=False) == []


def test_an_image_label_claims_no_service(world: World) -> None:
    """An image whose Dockerfile says `LABEL fluster.service=<this app's service>`: a push
    of it is refused naming the labels, and a container run from it without labels of its
    own is not registered, nor is one labelled with the service but not as its app's
    (the service belongs to the app), while one with a service of its own is. Requests to
    the app never reach the impostors."""
    world.sync()
    served = world.served()
    build = world.root / "impostor"
    build.mkdir()
    (build / "app.py").write_text(APP.format(mark="impostor", sick=False))
    (build / "Dockerfile").write_text(
        DOCKERFILE.format(
            extra=f"LABEL fluster.service={world.app} fluster.port=8000 fluster.check=none\n"
        )
    )
    image = f"fluster-test-impostor-{world.app}:1"
    world.engine.docker("build", "-q", "-t", image, str(build), timeout=300)
    stray = world.build_image("stray")
    control = f"c{world.app}"
    ids: list[str] = []
    try:
        with Load(world.reloader.http_port, f"{world.app}.localhost") as load:
            run = ("run", "-d", "-e", "PORT=8000", "-p", "127.0.0.1::8000")
            ids.append(world.engine.docker(*run, image).strip())  # the image's labels only
            # A label of its own (on an image without any), but the service belongs to the
            # app and this container is not the app's: a stray, refused.
            ids.append(world.engine.docker(*run, "-l", f"fluster.service={world.app}",
                                           stray).strip())  # fmt: skip
            ids.append(world.engine.docker(*run, "-l", f"fluster.service={control}",
                                           image).strip())  # fmt: skip
            # Events are handled in order: once the second is registered, the first was seen.
            wait_for(
                lambda: world.etcd.get_prefix(f"/fluster/services/{control}/instances/"),
                timeout=30,
                what=f"the control container registered in {control}",
            )
            names = world.etcd.get_prefix(f"/fluster/services/{world.app}/instances/")
        assert not any(cid[:12] in key for key in names for cid in ids[:2]), names
        log = world.sidekick_log()
        assert "ignoring fluster labels that come from the image" in log
        assert "refusing a container that claims another app's service" in log
        assert load.failures == [] and set(load.served) == {served}, load.served
        sha = world.commit("v-label", extra=f"LABEL fluster.service=z{world.app}\n")
        output = world.push_refused()
        assert "sets label(s) fluster.service" in output, output
        assert world.containers(sha[:12], running=False) == []
    finally:
        if ids:
            world.engine.docker("rm", "-f", *ids)
        world.engine.docker("rmi", "-f", image, stray)


def test_a_build_uses_no_other_apps_image_and_pulls_nothing(world: World) -> None:
    """Another app's image on the same engine (its files are its source): FROM it and
    COPY --from it are refused before the build; so is a base image the host does not
    have, which the engine would otherwise pull."""
    world.sync()
    secret = world.root / "other-app"
    secret.mkdir()
    (secret / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nRUN echo TOPSECRET > /secret\n")
    other = f"{world.registry.address}/o{world.app}:1"
    world.engine.docker("build", "-q", "-t", other, str(secret), timeout=300)
    attempts = {
        "from": (f"FROM {other}\nCMD cat /secret\n", "that is app o"),
        "copy": (
            f"FROM {BASE_IMAGE}\nCOPY --from={other} /secret /secret\n",
            "that is app o",
        ),
        "arg": (f"ARG BASE={other}\nFROM $BASE\n", "that is app o"),
        "pull": ("FROM fluster-test/no-such-image:1\n", "builds never pull"),
    }
    try:
        for name, (dockerfile, refusal) in attempts.items():
            (world.work / "Dockerfile").write_text(dockerfile)
            world.git("commit", "-q", "-am", f"steal {name}")
            output = world.push_refused()
            assert refusal in output and "TOPSECRET" not in output, (name, output)
            assert "Step 1/" not in output, f"{name}: the build started: {output}"
    finally:
        world.engine.docker("rmi", "-f", other)


def test_secrets_and_control_characters_are_never_printed(world: World) -> None:
    """A secret set with --secret reaches the containers and no listing; a build that
    prints terminal escapes shows its words without them, in the push and in the history."""
    world.sync()
    value = f"hunter2-{uuid.uuid4().hex[:6]}"
    configured = world.fluster("app", "config", world.app, "--secret", f"DB_PASSWORD={value}")
    assert configured.returncode == 0, configured.stderr
    assert value not in configured.stdout and '"DB_PASSWORD": "(secret)"' in configured.stdout
    listed = world.fluster("app", "ls", "--json")
    assert value not in listed.stdout and "DB_PASSWORD" in listed.stdout, listed.stdout
    escapes = r"RUN printf '\033]0;pwned\007\033[2J\033[31mRED WORDS\033[0m\n'" + "\n"
    sha = world.commit("v-secret", extra=escapes)
    pushed = world.push()
    output = pushed.stdout + pushed.stderr
    assert pushed.returncode == 0, output
    assert "RED WORDS" in output and "\x1b" not in output and "\x07" not in output, output
    history = world.fluster("deploys", world.app)
    assert "\x1b" not in history.stdout and value not in history.stdout
    (cid, *_) = world.containers(sha[:12])
    env = world.engine.docker("inspect", "-f", "{{json .Config.Env}}", cid)
    assert f"DB_PASSWORD={value}" in env
    world.versions["secret"] = sha[:12]


def test_an_abandoned_deploy_is_marked_and_its_containers_removed(world: World) -> None:
    """`fluster deploy` killed (SIGKILL) while it waits for a version that never gets
    healthy: its record stays `running` and its containers run, until `fluster gc APP`
    (after the dead deploy's lock lease ran out) marks it abandoned and removes them."""
    world.sync()
    active = world.active()
    sha = world.commit("v-abandoned", sick=True)
    world.git("reset", "-q", "--hard", "HEAD~1")
    proc = subprocess.Popen(
        [FLUSTER, "deploy", world.app, "--git", str(world.work), "--ref", sha],
        env=world.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        world.wait_started(sha[:12], "the doomed deploy's containers running")
        # Its containers run a moment before it reaches the gate (a parallel run killed
        # it in between): the record says when it is there.
        wait_for(
            lambda: "healthy" in world.stage_names(sha[:12]),
            timeout=30,
            what="the doomed deploy at its health gate",
        )
    finally:
        proc.kill()
        output = proc.communicate(timeout=30)[0]
    assert "healthy" in output, output
    assert [r["result"] for r in world.records(sha[:12])] == ["running"]
    lock = f"/fluster/apps/{world.app}/lock"
    wait_for(lambda: world.etcd.get(lock) is None, timeout=30, what="the dead deploy's lock gone")
    gc = world.fluster("gc", world.app)  # may then refuse the rest (--keep-old 1h): fine
    assert "was abandoned mid-way" in gc.stdout, gc.stdout + gc.stderr
    assert "2 of its container(s) removed" in gc.stdout, gc.stdout
    assert [r["result"] for r in world.records(sha[:12])] == ["abandoned"]
    assert world.containers(sha[:12], running=False) == []
    assert world.active() == active


def test_a_push_cut_off_before_the_promotion_changes_nothing(world: World) -> None:
    """The pusher's git (and its ssh) killed while the deploy waits at the health gate:
    the deploy notices, stops before the promotion, removes its containers and records
    why; what serves does not change."""
    world.sync()
    active, before = world.active(), world.served()
    world.fluster("app", "config", world.app, "--health-timeout", "90")
    sha = world.commit("v-cut", sick=True)
    proc = subprocess.Popen(
        ["git", "push", "origin", "HEAD:main"],
        cwd=world.work,
        env={**world.sshd.git_env(), **IDENTITY},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with Load(world.reloader.http_port, f"{world.app}.localhost") as load:
            try:
                world.wait_started(sha[:12], "the cut-off push's containers running")
            finally:
                os.killpg(proc.pid, signal.SIGKILL)  # the developer's git and ssh: gone
                proc.communicate(timeout=30)

            def recorded() -> dict[str, str] | None:
                done = world.records(sha[:12])
                return done[-1] if done and done[-1]["result"] != "running" else None

            record = wait_for(recorded, timeout=60, what="the cut-off deploy recorded as ended")
            wait_for(
                lambda: world.containers(sha[:12], running=False) == [],
                timeout=30,
                what="the cut-off deploy's containers removed",
            )
    finally:
        world.git("reset", "-q", "--hard", "HEAD~1")
        world.fluster("app", "config", world.app, "--health-timeout", "30")
    assert record["result"] == "failed" and "disconnected" in record["error"], record
    assert world.active() == active
    assert load.failures == [] and set(load.served) == {before}, load.failures[:5]


def test_a_push_is_bounded_in_size_and_time(world: World) -> None:
    """The deploy host's bounds, set at `app create`: a tree over --max-context is refused
    before a byte is built, a build past --build-timeout is stopped (its container goes),
    and nothing that serves changes."""
    world.sync()
    bounds = ("--max-context", "1", "--build-timeout", "5")
    again = world.fluster("app", "create", world.app, *bounds)
    assert again.returncode == 0, again.stderr
    before = world.served()
    try:
        (world.work / "blob.bin").write_bytes(os.urandom(2 * 2**20))
        world.commit("v-big")
        big = world.push_refused()
        assert "over the limit of 1 MiB" in big, big
        world.commit("v-slow", extra='RUN echo "slow build"; sleep 600\n')
        slow = world.push_refused()
        assert "build time limit (5s)" in slow, slow
        wait_for(
            lambda: "sleep 600" not in world.engine.docker("ps", "--no-trunc"),
            timeout=30,
            what="the stopped build's container removed",
        )
    finally:
        world.fluster("app", "create", world.app)  # the hook again, without the bounds
    assert world.served() == before
