"""D1: `git push` -> the new version serving all traffic, stage by stage, failed requests.

Real parts only: the demo app (examples/demo-app) in a git repository, pushed to its app
repository on this host (a local path: the ssh hop is the tests' business), whose hook
runs `fluster deploy`; the Docker engine building on the local base image; Debian's
docker-registry on loopback; a sidekick host agent with its default check settings
(interval 2 s, rise 2); the reloader with HAProxy; and a request loop through HAProxy
(one new connection per request, one kept alive) that records who answered and when.

One push warms the build cache and the registry (the base layer is pushed once); then
each measured push changes one line of the app. "Serving all traffic" is when the last
answer from any other version was seen: from then on every answer came from the new one.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import Row
from testbed.etcd import Etcd
from testbed.load import RequestLoops
from testbed.registry import Registry
from testbed.reloader import ReloaderProcess
from testbed.sidekick import Sidekicks
from testbed.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
FLUSTER = str(Path(sys.executable).with_name("fluster"))
STAGES = ("build", "push", "start", "healthy", "promote", "retire")
GOAL = 15.0  # serving all traffic
PUSH_GOAL = 8.0  # `git push` returned (the retirement goes on after it)


@dataclass
class Trial:
    push: float  # git push started -> returned
    serving: float | None  # git push started -> last answer from another version
    stages: dict[str, float]
    failed: int
    answered: int


@dataclass
class DeployFigures:
    trials: list[Trial] = field(default_factory=list)
    warm_up: float = 0.0
    errors: list[str] = field(default_factory=list)


class Answers(RequestLoops):
    """Request loops through HAProxy keeping (time, version) of every answer."""

    def __init__(self, port: int, host: str, limit: float = 300.0) -> None:
        super().__init__(port, host, limit=limit, headers={"Accept": "application/json"})
        self.seen: list[tuple[float, str]] = []

    def answered(self, body: bytes, sent: float) -> None:
        self.seen.append((time.monotonic(), json.loads(body)["version"]))


def _git(work: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}  # fmt: skip
    out = subprocess.run(
        ["git", *args], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(f"git {args[0]} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


def _commit(work: Path, n: int) -> str:
    app = (REPO / "examples/demo-app/app.py").read_text()
    (work / "app.py").write_text(app + f"\n# bench revision {n}\n")
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", f"bench revision {n}")
    return _git(work, "rev-parse", "HEAD").strip()[:12]


def d1_deploy(work: Path, etcd: Etcd, trials: int = 3) -> DeployFigures:
    figures = DeployFigures()
    app = f"bench{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "ETCD_ENDPOINTS": etcd.endpoints}
    registry = Registry(work / "d1-registry").start()
    reloader = ReloaderProcess(etcd, work / "d1-reloader").start()
    sidekicks = Sidekicks(etcd, work / "d1")
    (work / "d1").mkdir(exist_ok=True)
    sidekicks.start("--all", "--node", f"n{app}")
    repos, src = work / "d1-repos", work / "d1-src"
    try:
        env["FLUSTER_REGISTRY"] = registry.address
        create = subprocess.run(
            [FLUSTER, "app", "create", app, "--repos", str(repos), "--replicas", "2"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if create.returncode != 0:
            raise RuntimeError(create.stderr)
        src.mkdir()
        (src / "Dockerfile").write_text((REPO / "examples/demo-app/Dockerfile").read_text())
        _git(src, "init", "-q", "-b", "main")
        _git(src, "remote", "add", "production", str(repos / f"{app}.git"))
        _commit(src, 0)
        started = time.monotonic()
        _git(src, "push", "-q", "production", "HEAD:main")
        figures.warm_up = time.monotonic() - started
        host = f"{app}.localhost"
        for n in range(1, trials + 1):
            version = _commit(src, n)
            with Answers(reloader.http_port, host) as answers:
                wait_for(lambda: len(answers.seen) > 50, timeout=30, what="load running")
                t0 = time.monotonic()
                _git(src, "push", "-q", "production", "HEAD:main")
                t1 = time.monotonic()
                time.sleep(1.0)  # a second of answers after the push returned
            others = [t for t, v in answers.seen if v != version]
            last_other = max((t for t in others if t >= t0), default=t0)
            new_after = any(v == version and t > last_other for t, v in answers.seen)

            def releases() -> list[dict[str, object]]:
                out = subprocess.run(
                    [FLUSTER, "releases", app, "--json"],
                    env=env, capture_output=True, text=True, timeout=60, check=True,
                )  # fmt: skip
                return list(json.loads(out.stdout))

            # The retirement goes on after the push: the next trial starts once it ended.
            records = wait_for(
                lambda: (
                    (r := releases())
                    and any(s["name"] == "retire" and s.get("ended") for s in r[-1]["stages"])  # type: ignore[attr-defined]
                    and r
                ),
                timeout=60,
                what="the old release retired",
            )
            stages = {
                s["name"]: _seconds(s["started"], s["ended"])
                for s in records[-1]["stages"]
                if s.get("ended")
            }
            figures.trials.append(
                Trial(
                    push=t1 - t0,
                    serving=(last_other - t0) if new_after else None,
                    stages=stages,
                    failed=len(answers.failures),
                    answered=len(answers.seen),
                )
            )
            if answers.failures:
                figures.errors.append(f"D1 trial {n}: failures {answers.failures[:5]}")
    finally:
        ids = subprocess.run(
            ["/usr/bin/docker", "ps", "-aq", "--filter", f"label=fluster.app={app}"],
            capture_output=True, text=True, check=False,
        ).stdout.split()  # fmt: skip
        if ids:
            subprocess.run(["/usr/bin/docker", "rm", "-f", *ids], capture_output=True, check=False)
        sidekicks.close()
        reloader.stop()
        registry.stop()
    return figures


def _seconds(start: str, end: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def row(command: str, f: DeployFigures) -> Row:
    serving = [t.serving for t in f.trials if t.serving is not None]
    failed = sum(t.failed for t in f.trials)
    answered = sum(t.answered for t in f.trials)
    worst = max(serving) if serving else None
    ok = bool(f.trials) and len(serving) == len(f.trials) and worst is not None
    pushed = max((t.push for t in f.trials), default=0.0)
    ok = ok and worst <= GOAL and failed == 0 and pushed <= PUSH_GOAL  # type: ignore[operator]

    def med(name: str) -> str:
        values = [t.stages[name] for t in f.trials if name in t.stages]
        return f"{statistics.median(values):.1f}" if values else "-"

    ours = (
        f"serving all traffic {statistics.median(serving):.1f} s median, {worst:.1f} s max; "
        f"push returned {statistics.median([t.push for t in f.trials]):.1f} s median, "
        f"{pushed:.1f} s max; "
        f"stages (median s) build {med('build')}, push {med('push')}, "
        f"release {med('release')}, start {med('start')}, healthy {med('healthy')}, "
        f"promote {med('promote')}, retire (after the push) {med('retire')}; "
        f"{failed} failed of {answered:,}"
        if serving
        else "no trial completed"
    )
    notes = [
        f"{len(f.trials)} pushes of the demo app, each changing one line of app.py, after a "
        f"warm-up push ({f.warm_up:.1f} s: the first build and the base layer's push to the "
        "registry). Replicas 2; the sidekick host agent with its defaults (check every 2 s, "
        "2 passes to register), which sets the floor of the healthy stage.",
        "Serving all traffic = from just before `git push` until the last answer from the old "
        "version, as seen by a request loop through HAProxy (one new connection per request "
        "plus one keep-alive connection). The push returns once the new release serves; "
        "the retire stage (drain 2 s, then the old containers stop, the demo app draining "
        "3 s on SIGTERM) goes on in the background and is read from `fluster releases`.",
        "Per trial (push s / serving s / stages): "
        + "; ".join(
            f"{t.push:.1f} / {t.serving if t.serving is None else round(t.serving, 1)} / "
            + " ".join(f"{k} {v:.1f}" for k, v in t.stages.items())
            for t in f.trials
        ),
    ]
    return Row(
        key="D1",
        what="git push -> new version serving all traffic (demo app, warm build cache)",
        goal=f"push returns <= {PUSH_GOAL:g} s, serving < {GOAL:g} s, 0 failed requests",
        ours=ours,
        verdict="yes" if ok else "**no**",
        command=command,
        notes=notes + f.errors,
    )
