"""An app from day to day, on real parts: releases, config changes, scale, logs, run,
a release phase, rollback to any release, limits and volumes.

One module-wide world, as `test_git_deploy.py` has, but the app is pushed from this
host (`git push` to the bare repository's path runs the same hook a push over ssh
does): real etcd, Debian's docker-registry on loopback, a real sidekick host agent, a
real reloader with HAProxy, the real Docker engine. The tests run in order on one app,
each from where the one before left it, and each change happens under a request loop
through HAProxy that counts every failed request.

The app answers `{mark} {COLOR}`: its code's mark and its environment's COLOR, so a
test tells a code release from a config release by what it is served.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployer.cli import remove_images
from deployer.engine import Engine as DockerEngine
from deployer.records import DeployRecord
from testbed.docker import BASE_IMAGE
from testbed.load import Load
from tests.support.deployhost import deploy_host
from tests.support.docker import Engine, docker_cmd
from tests.support.etcd import Etcd, wait_for
from tests.support.gitapp import COLOR_APP, IDENTITY
from tests.support.haproxy import ReloaderProcess

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FLUSTER = str(Path(sys.executable).with_name("fluster"))

# The image's CMD would fail: the Procfile's web: line is what the instances run.
DOCKERFILE = f"""\
FROM {BASE_IMAGE}
ENV PYTHONUNBUFFERED=1
COPY app.py /app.py
CMD ["false"]
"""


@dataclass
class World:
    etcd: Etcd
    reloader: ReloaderProcess
    engine: Engine
    root: Path
    app: str
    registry: str
    repos: Path
    work: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ETCD_ENDPOINTS": self.etcd.endpoints,
            "FLUSTER_REGISTRY": self.registry,
            "FLUSTER_REPOS": str(self.repos),
        }

    @property
    def host(self) -> str:
        return f"{self.app}.localhost"

    def fluster(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FLUSTER, *args], capture_output=True, text=True, env=self.env, timeout=180,
            input=stdin,
        )  # fmt: skip

    def ok(self, *args: str) -> str:
        done = self.fluster(*args)
        assert done.returncode == 0, f"fluster {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args], cwd=self.work, capture_output=True, text=True,
            env={**os.environ, **IDENTITY}, timeout=300,
        )  # fmt: skip

    def commit(self, mark: str, procfile: str) -> None:
        (self.work / "app.py").write_text(COLOR_APP.format(mark=mark))
        (self.work / "Dockerfile").write_text(DOCKERFILE)
        (self.work / "Procfile").write_text(procfile)
        for args in (("add", "-A"), ("commit", "-q", "-m", f"app {mark}")):
            out = self.git(*args)
            assert out.returncode == 0, out.stderr

    def push(self) -> subprocess.CompletedProcess[str]:
        return self.git("push", "origin", "HEAD:main")

    def releases(self) -> list[dict[str, Any]]:
        return list(json.loads(self.ok("releases", self.app, "--json")))

    def current(self) -> dict[str, Any]:
        """The newest release (a failed deploy after it is not one)."""
        return next(r for r in reversed(self.releases()) if r["release"] != "-")

    def served(self, expected: str, timeout: float = 30) -> None:
        """Until `expected` alone answers through HAProxy."""
        wait_for(
            lambda: self.reloader.served_by(self.host, 6) == {expected},
            timeout=timeout,
            interval=0.2,
            what=f"{expected!r} alone served (reloader log: {self.reloader.log_path})",
        )

    def containers(self, version: str = "", *, running: bool = True) -> list[str]:
        args = ["ps", "-q", "--filter", f"label=fluster.app={self.app}"]
        if version:
            args += ["--filter", f"label=fluster.version={version}"]
        return self.engine.docker(*args, *([] if running else ["-a"])).split()

    def retired(self, release: dict[str, Any]) -> None:
        """Until the release's background retirement is recorded as done."""

        def done() -> bool:
            rec = next(r for r in self.releases() if r["id"] == release["id"])
            return any(s["name"] == "retire" and s["ok"] for s in rec["stages"])

        wait_for(done, timeout=60, what=f"{release['release']} retired the old release")


PROCFILE = "web: python3 /app.py\nrelease: echo migrating with COLOR=$COLOR\n"


@pytest.fixture(scope="module")
def world(docker_engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("day2")
    app = f"e{uuid.uuid4().hex[:8]}"
    # The app's containers on a network of their own, as the compose demo's are: a
    # one-off (`fluster run`) joins it.
    docker_cmd("network", "create", f"day2-{app}")
    try:
        with deploy_host(root, app) as host:
            work = root / "work"
            world = World(host.etcd, host.reloader, Engine(docker_engine.host), root, app,
                          host.registry.address, root / "repos", work)  # fmt: skip
            world.ok("app", "create", app, "--replicas", "2", "--health-timeout", "30",
                     "--drain-seconds", "1", "--keep-old", "1h", "--env", "COLOR=red",
                     "--network", f"day2-{app}")  # fmt: skip
            work.mkdir()
            remote = str(world.repos / f"{app}.git")
            for args in (("init", "-q", "-b", "main"), ("remote", "add", "origin", remote)):
                assert world.git(*args).returncode == 0
            world.commit("one", PROCFILE)
            pushed = world.push()
            output = pushed.stdout + pushed.stderr
            assert pushed.returncode == 0, output
            assert "remote:        migrating with COLOR=red" in output, output
            world.served("one red", 60)
            yield world
    finally:
        docker_cmd("volume", "rm", "-f", f"{app}-data", check=False)
        docker_cmd("network", "rm", f"day2-{app}", check=False)


def test_a_push_is_release_v1_and_returns_before_the_old_one_retires(world: World) -> None:
    (first,) = world.releases()
    assert (first["release"], first["kind"], first["result"]) == ("v1", "deploy", "succeeded")
    assert first["author"] == "Dev <dev@example.invalid>" and first["by"], first
    assert [s["name"] for s in first["stages"]][:4] == ["build", "push", "release", "start"]
    world.commit("two", PROCFILE)
    with Load(world.reloader.http_port, world.host) as load:
        wait_for(lambda: load.served["one red"] > 20, what="load running on one")
        pushed = world.push()
        output = pushed.stdout + pushed.stderr
        assert pushed.returncode == 0, output
        after = load.only()
        second = world.releases()[-1]
        world.retired(second)
    assert after == {"two red"}, f"answers right after the push: {after}"
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}"
    assert "v2 serves" in output and "retires in the background" in output, output
    assert second["release"] == "v2"
    assert world.containers(first["version"]) == [], "v1 still running after its retirement"
    assert len(world.containers(first["version"], running=False)) == 2, "v1 kept for rollback"


def test_a_config_change_is_a_new_release_of_the_same_image(world: World) -> None:
    code = world.releases()[-1]
    with Load(world.reloader.http_port, world.host) as load:
        wait_for(lambda: load.served["two red"] > 20, what="load running on two red")
        out = world.ok("app", "config", world.app, "--env", "COLOR=blue")
        after = load.only()
    assert after == {"two blue"}, f"answers right after the config change: {after}\n{out}"
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}"
    release = world.releases()[-1]
    assert (release["release"], release["kind"]) == ("v3", "config"), release
    assert release["image"] == code["image"] and release["version"] != code["version"]
    assert release["runtime"]["env"] == {"COLOR": "blue"}
    assert world.containers(code["version"]) == [], "the code release's containers still run"

    stored = world.ok("app", "config", world.app, "--env", "COLOR=green", "--no-restart")
    assert "not restarted" in stored
    world.served("two blue", 5)
    assert world.releases()[-1]["release"] == "v3"
    world.ok("app", "config", world.app, "--env", "COLOR=blue", "--no-restart")


def test_a_config_release_that_fails_its_gate_changes_nothing(world: World) -> None:
    before = world.releases()
    with Load(world.reloader.http_port, world.host) as load:
        wait_for(lambda: load.served["two blue"] > 20, what="load running on two blue")
        failed = world.fluster("app", "config", world.app, "--env", "COLOR=crash")
        time.sleep(0.5)  # a few more requests after the refusal (not a sync)
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1, output
    assert "no such colour: crash" in output and "config restored" in output, output
    assert load.failures == [] and set(load.served) == {"two blue"}, (load.failures, load.served)
    assert json.loads(world.ok("app", "config", world.app))["env"] == {"COLOR": "blue"}
    after = world.releases()
    assert after[-1]["result"] == "failed" and len(after) == len(before) + 1
    assert [r["release"] for r in after[:-1]] == [r["release"] for r in before]


def test_a_release_failing_one_request_in_five_is_rolled_back_by_its_canary(
    world: World,
) -> None:
    """Progressive delivery: with canary steps, a config release that passes its health
    check yet fails a fifth of its requests is judged by the edge's counters at its
    first step (10 %), rolled back, and the config restored."""
    world.ok("app", "config", world.app, "--canary-steps", "10,50", "--canary-interval", "3s")
    try:
        with Load(world.reloader.http_port, world.host) as load:
            wait_for(lambda: load.served["two blue"] > 20, what="load running on two blue")
            before = sum(load.served.values()) + len(load.failures)
            failed = world.fluster("app", "config", world.app, "--env", "COLOR=flaky")
            window = sum(load.served.values()) + len(load.failures) - before
    finally:
        world.ok("app", "config", world.app, "--canary-steps", "none")
    output = failed.stdout + failed.stderr
    assert failed.returncode == 1, output
    assert "canary 10 %: 5xx" in output and "-> rolled back" in output, output
    assert "config restored" in output and "canary 50 %" not in output, output
    assert len(load.failures) <= 0.03 * window, (len(load.failures), window)
    world.served("two blue", 10)
    assert json.loads(world.ok("app", "config", world.app))["env"] == {"COLOR": "blue"}
    assert world.releases()[-1]["result"] == "failed"
    assert len(world.containers(world.releases()[-1]["version"], running=False)) == 0


def test_a_deploy_killed_mid_analysis_leaves_no_canary_behind(world: World) -> None:
    """The deployer SIGKILLed during its canary analysis: the lock frees with its lease;
    the canary share it had routed (a healthy release) stays until the next deploy of the
    app or `fluster gc APP`, which ends it and removes its containers."""
    world.ok("app", "config", world.app, "--canary-steps", "10,50", "--canary-interval", "30s")
    proc = subprocess.Popen(
        [FLUSTER, "app", "config", world.app, "--env", "COLOR=green"], env=world.env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(
            lambda: any(s["name"] == "analysis" for s in world.releases()[-1]["stages"]),
            timeout=90,
            what="the config release at its canary analysis",
        )
        canary = world.releases()[-1]["version"]
        wait_for(lambda: world.reloader.served_by(world.host, 40) >= {"two green"},
                 timeout=20, what="the canary's share served")  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    world.ok("app", "config", world.app, "--canary-steps", "none", "--env", "COLOR=blue",
             "--no-restart")  # fmt: skip
    # Its lock goes with its lease (10 s); until then the deploy is not known dead.
    wait_for(
        lambda: "ending the canary of" in world.fluster("gc", world.app).stdout,
        timeout=40,
        interval=1,
        what="fluster gc ending the dead deploy's canary",
    )
    world.served("two blue", 10)
    assert world.containers(canary, running=False) == []
    assert world.releases()[-2]["result"] == "abandoned" or any(
        r["version"] == canary and r["result"] == "abandoned" for r in world.releases()
    )


def test_scale_up_gates_the_new_ones_and_down_drains_first(world: World) -> None:
    version = world.current()["version"]
    out = world.ok("scale", world.app, "3")
    assert "3 instance(s)" in out, out
    assert len(world.containers(version)) == 3
    assert json.loads(world.ok("app", "config", world.app))["replicas"] == 3
    with Load(world.reloader.http_port, world.host) as load:
        wait_for(lambda: sum(load.served.values()) > 20, what="load running")
        out = world.ok("scale", world.app, "1")
        time.sleep(0.5)  # a few more requests after the scale-down returned (not a sync)
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}\n{out}"
    assert "draining" in out, out
    assert len(world.containers(version)) == 1
    world.ok("scale", world.app, "2")
    assert len(world.containers(version)) == 2


def test_logs_of_every_instance_prefixed_with_release_and_instance(world: World) -> None:
    out = world.ok("logs", world.app, "--tail", "5")
    lines = [line for line in out.splitlines() if "starting with COLOR=blue" in line]
    assert len(lines) >= 2, out
    assert all(line.startswith(f"v3 {world.app}-") and " | app two" in line for line in lines)
    # A retired release's stopped containers keep their output (v1's are removed by now:
    # a retirement keeps the containers of the release it retires only).
    old = world.ok("logs", world.app, "--release", "v2")
    assert "v2 " in old and "app two starting with COLOR=red" in old, old
    missing = world.fluster("logs", world.app, "--release", "v99")
    assert missing.returncode == 2 and "no release 'v99'" in missing.stderr


def test_logs_follow_prints_the_lines_of_instances_started_meanwhile(world: World) -> None:
    proc = subprocess.Popen(
        [FLUSTER, "logs", world.app, "-f", "--tail", "0"], env=world.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        version = world.current()["version"]
        world.ok("scale", world.app, "3")  # a new instance logs its start
        assert len(world.containers(version)) == 3
        wait_for(
            lambda: any("app two starting with COLOR=blue" in line for line in lines),
            timeout=15,
            what=f"the new instance's first line followed (so far: {lines})",
        )
        assert all(line.startswith("v3 ") for line in lines), lines
    finally:
        proc.kill()
        proc.communicate(timeout=30)  # closes the pipes
    world.ok("scale", world.app, "2")


def test_run_a_one_off_command_with_the_release_env_and_exit_status(world: World) -> None:
    done = world.fluster("run", world.app, "--", "sh", "-c", 'echo "color $COLOR"; cat; exit 3',
                         stdin="from stdin\n")  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["color blue", "from stdin"], done.stdout
    oneoffs = docker_cmd("ps", "-aq", "--filter", f"label=fluster.oneoff={world.app}")
    assert oneoffs.stdout.split() == [], "the one-off container was left behind"
    # On the instances' network: their names resolve (Docker's DNS on a user network).
    name = world.engine.docker("inspect", "-f", "{{.Name}}", world.containers()[0]).lstrip("/")
    resolved = world.fluster("run", world.app, "--", "getent", "hosts", name)
    assert resolved.returncode == 0, resolved.stdout + resolved.stderr
    # On a terminal (script(1) gives it one), the one-off gets a tty of its own.
    if shutil.which("script"):
        command = f"{FLUSTER} run {world.app} -- sh -c 'tty; exit 4'"
        tty = subprocess.run(
            ["script", "-qec", command, "/dev/null"], capture_output=True, text=True,
            env=world.env, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert tty.returncode == 4 and "/dev/pts/" in tty.stdout, tty.stdout + tty.stderr
    usage = world.fluster("run", world.app)
    assert usage.returncode == 2 and "after --" in usage.stdout + usage.stderr


def test_a_failing_release_phase_refuses_the_push_and_changes_nothing(world: World) -> None:
    before = world.releases()
    world.commit("three", "web: python3 /app.py\nrelease: echo migration failed; exit 7\n")
    try:
        with Load(world.reloader.http_port, world.host) as load:
            wait_for(lambda: load.served["two blue"] > 20, what="load running on two blue")
            pushed = world.push()
            time.sleep(0.5)  # a few more requests after the refusal (not a sync)
    finally:
        world.git("reset", "-q", "--hard", "HEAD~1")
    output = pushed.stdout + pushed.stderr
    assert pushed.returncode != 0, output
    assert "migration failed" in output and "exited with status 7" in output, output
    assert "-----> start" not in output, output
    assert load.failures == [] and set(load.served) == {"two blue"}, (
        load.failures[:5],
        load.served,
    )
    after = world.releases()
    assert after[-1]["result"] == "failed" and after[-1]["release"] == "-"
    assert [r["release"] for r in after[:-1]] == [r["release"] for r in before]


def test_rollback_to_any_release_brings_its_config_back(world: World) -> None:
    first = world.releases()[0]
    with Load(world.reloader.http_port, world.host) as load:
        wait_for(lambda: load.served["two blue"] > 20, what="load running on two blue")
        out = world.ok("rollback", world.app, "--to", "v1")
        after = load.only()
    assert after == {"one red"}, f"answers after rollback --to v1: {after}\n{out}"
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}"
    last = world.releases()[-1]
    assert (last["kind"], last["version"], last["release"]) == ("rollback", first["version"], "v4")
    assert json.loads(world.ok("app", "config", world.app))["env"] == {"COLOR": "red"}
    missing = world.fluster("rollback", world.app, "--to", "v42")
    assert missing.returncode == 1 and "no release 'v42'" in missing.stderr
    # and forward again, by sha: the config release v3 (two, blue)
    v3 = next(r for r in world.releases() if r["release"] == "v3")
    world.ok("rollback", world.app, "--to", v3["version"])
    world.served("two blue")


def test_limits_and_volumes_are_a_release_and_reach_the_containers(world: World) -> None:
    with Load(world.reloader.http_port, world.host) as load:
        wait_for(lambda: load.served["two blue"] > 20, what="load running on two blue")
        world.ok("app", "config", world.app, "--memory", "64m", "--cpus", "0.5",
                 "--volume", "data:/data")  # fmt: skip
    assert load.failures == [], f"{len(load.failures)} failed: {load.failures[:10]}"
    release = world.releases()[-1]
    assert release["kind"] == "config" and release["runtime"]["memory"] == "64m"
    ids = world.containers(release["version"])
    assert len(ids) == 2
    info = json.loads(world.engine.docker("inspect", *ids))
    for c in info:
        assert c["HostConfig"]["Memory"] == 64 << 20
        assert c["HostConfig"]["NanoCpus"] == 500_000_000
        assert [(m["Name"], m["Destination"]) for m in c["Mounts"]] == [
            (f"{world.app}-data", "/data")
        ]
    bad = world.fluster("app", "config", world.app, "--volume", "/etc:/host-etc")
    assert bad.returncode == 2 and "never a host path" in bad.stderr, bad.stderr


def test_gc_keeps_the_images_of_the_last_ten_releases(world: World) -> None:
    """`remove_images` (what `fluster gc APP` runs after the containers) on the real
    engine: twelve tags of one image, eleven of them releases; the oldest release's and
    the one no release names go, the last ten stay."""
    repo = f"{world.registry}/{world.app}-gc"
    tags = [f"{repo}:{n:012x}" for n in range(12)]
    for tag in tags:
        world.engine.docker("tag", BASE_IMAGE, tag)
    history = [
        DeployRecord(
            id=f"{n:03d}", app=f"{world.app}-gc", kind="deploy", ref="", version=f"{n:012x}",
            image=tags[n], by="", started="2026-12-07T00:00:00", result="succeeded", number=n + 1,
        )
        for n in range(11)
    ]  # fmt: skip

    async def gc() -> list[str]:
        async with DockerEngine() as engine:
            return await remove_images(engine, world.registry, f"{world.app}-gc", list(history))

    try:
        assert sorted(asyncio.run(gc())) == [tags[0], tags[11]]
        left = world.engine.docker("images", "--format", "{{.Repository}}:{{.Tag}}", repo)
        assert sorted(left.split()) == tags[1:11]
    finally:
        for tag in tags:
            docker_cmd("rmi", tag, check=False)
