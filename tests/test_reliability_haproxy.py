"""R5 and the HAProxy half of R7: HAProxy processes dying under the reloader, and the
reloader's own attack surface (sockets, files) with least-privilege etcd credentials.

A killed HAProxy worker takes its master down with it (HAProxy's default for a worker
that exits abnormally), and the reloader starts the pair again; a killed master is the
same restart. Each must serve again within a second. (`tests/test_reloader.py` also
checks the master kill alone; here both happen in sequence.)
"""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess
from tests.support.rbac import (
    RELOADER_PASSWORD,
    RbacEtcd,
    assert_no_secrets,
    component_env,
    sidekick_identity,
)
from tests.support.sidekick import Sidekicks

pytestmark = pytest.mark.slow

KEY = "/fluster/services/web/instances/{}"


def back_within(reloader: ReloaderProcess, ident: str, started: float) -> float:
    """Seconds from `started` until a request through HAProxy is answered by `ident`."""

    def ok() -> bool:
        try:
            return reloader.get("web.localhost") == (200, ident)
        except OSError:
            return False

    wait_for(ok, timeout=5, interval=0.01, what="serving again")
    return time.monotonic() - started


def test_r5_worker_then_master_killed_serving_again_within_a_second(
    etcd: Etcd,
    start_reloader: Callable[..., ReloaderProcess],
    backends: Callable[..., list[HttpBackend]],
) -> None:
    (app,) = backends(1)
    etcd.put(KEY.format("a"), app.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {app.ident})

    (worker,) = reloader.workers()
    master = reloader.haproxy_pid()
    os.kill(worker, signal.SIGKILL)
    worker_gap = back_within(reloader, app.ident, time.monotonic())
    wait_for(lambda: reloader.status()["haproxy_up"], what="reloader saw it")

    master2 = reloader.haproxy_pid()
    os.kill(master2, signal.SIGKILL)
    master_gap = back_within(reloader, app.ident, time.monotonic())

    assert worker_gap < 1.0, f"worker kill: {worker_gap:.2f}s without service"
    assert master_gap < 1.0, f"master kill: {master_gap:.2f}s without service"
    assert master2 != master, "the worker's death took its master down (exit-on-failure)"
    wait_for(lambda: reloader.status()["haproxy_restarts"] == 2, what="both restarts counted")
    wait_for(lambda: reloader.haproxy_pid() not in (master, master2), what="pid file updated")
    # Restarted from the live file: still the same servers, and changes still apply.
    (app2,) = backends(1)
    etcd.put(KEY.format("b"), app2.json())
    reloader.wait_served("web.localhost", {app.ident, app2.ident})
    # No HAProxy orphans: one master, one worker.
    assert len(reloader.workers()) == 1


def test_a_haproxy_restarted_right_after_a_runtime_change_serves_that_change(
    etcd: Etcd,
    start_reloader: Callable[..., ReloaderProcess],
    backends: Callable[..., list[HttpBackend]],
) -> None:
    """The files follow runtime changes a moment later (once the catalog is quiet): a
    HAProxy killed in that moment once came back from files without the change, and a
    new service answered 404 until the reload after the restart (the chaos soak saw 131
    failed requests). Now the files are written before the new master reads them."""
    web, api = backends(2)
    etcd.put(KEY.format("a"), web.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {web.ident})

    etcd.put("/fluster/services/api/instances/b", api.json())

    def answer(host: str) -> tuple[int, str] | None:
        try:
            return reloader.get(host)
        except OSError:
            return None  # between the kill and the restarted master's accept

    wait_for(lambda: answer("api.localhost") == (200, api.ident), interval=0.005, what="api")
    routes = (reloader.state_dir / "routes.map").read_text()
    assert "api.localhost" not in routes, "the files were written already: nothing to test"
    os.kill(reloader.haproxy_pid(), signal.SIGKILL)
    wait_for(lambda: reloader.status()["haproxy_restarts"] == 1, what="HAProxy restarted")
    answers = set()
    deadline = time.monotonic() + 1.0  # the reload that follows a restart comes within it
    while time.monotonic() < deadline:
        answers.add(answer("api.localhost"))
    assert answers - {None} == {(200, api.ident)}, answers


# -- R7: the edge under least-privilege etcd credentials ---------------------------------


def test_r7_reloader_and_sidekick_with_their_identities(
    etcd_rbac: RbacEtcd,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    backends: Callable[..., list[HttpBackend]],
) -> None:
    """Each with its own certificate (ETCD_CACERT/ETCD_CERT/ETCD_KEY), plus a reloader
    with a password: the registry flows from sidekick to HAProxy, the reloader publishes
    its status key, HAProxy's sockets are mode 600, and no secret reaches a log line."""
    (app,) = backends(1)
    endpoints = ",".join(etcd_rbac.https_endpoints)
    target = SimpleNamespace(endpoints=endpoints)  # ReloaderProcess reads only this
    sidekicks = Sidekicks(etcd_rbac.etcd, tmp_path / "sk")
    (tmp_path / "sk").mkdir()
    reloaders: list[ReloaderProcess] = []
    try:
        sidekicks.start(
            "--service", "web", "--address", app.address, "--node", "n1", "--ttl", "3",
            **component_env(etcd_rbac, sidekick_identity("web")),
        )  # fmt: skip
        for name, value in component_env(etcd_rbac, "reloader").items():
            monkeypatch.setenv(name, value)
        reloaders.append(ReloaderProcess(target, tmp_path / "edge-cert").start())  # type: ignore[arg-type]
        # The same role behind a password; the certificate is then just the TLS client's.
        monkeypatch.setenv("ETCD_USER", "reloader-pw")
        monkeypatch.setenv("ETCD_PASSWORD", RELOADER_PASSWORD)
        monkeypatch.setenv("ETCD_CERT", str(etcd_rbac.pki.client_cert("anyone")))
        monkeypatch.setenv("ETCD_KEY", str(etcd_rbac.pki.client_key("anyone")))
        reloaders.append(
            ReloaderProcess(target, tmp_path / "edge-pw", "--id", "edge-pw").start()  # type: ignore[arg-type]
        )
        for reloader in reloaders:
            reloader.wait_served("web.localhost", {app.ident})
            for sock in ("admin.sock", "master.sock"):
                mode = stat.S_IMODE((reloader.state_dir / sock).stat().st_mode)
                assert mode == 0o600, f"{sock} is {mode:o}"
        published = etcd_rbac.etcd.ctl("get", "--prefix", "--keys-only", "/fluster/reloaders/")
        assert "edge-test" in published.stdout and "edge-pw" in published.stdout

        # A reloader given a sidekick's identity cannot read the registry: it says so and
        # exits non-zero (its supervisor restarts it), rather than serving nothing quietly.
        monkeypatch.delenv("ETCD_USER")
        monkeypatch.delenv("ETCD_PASSWORD")
        for name, value in component_env(etcd_rbac, sidekick_identity("api")).items():
            monkeypatch.setenv(name, value)
        wrong = ReloaderProcess(target, tmp_path / "edge-wrong", "--id", "wrong")  # type: ignore[arg-type]
        reloaders.append(wrong.start(wait=False))
        assert wrong.proc is not None
        assert wrong.proc.wait(30) != 0
        assert "permission denied" in wrong.log()
    finally:
        for reloader in reloaders:
            reloader.stop()
        sidekicks.close()
    logs = {str(r.log_path): r.log() for r in reloaders}
    logs.update({str(p.log_path): p.log() for p in sidekicks.procs})
    assert_no_secrets(etcd_rbac, logs)
