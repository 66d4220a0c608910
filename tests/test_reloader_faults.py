"""What must not break the edge: bad templates, bad options, hostile records, compaction."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from reloader.render import DEFAULT_TEMPLATES
from testbed.ports import PORT_ATTEMPTS
from tests.support.etcd import Etcd, free_port, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess
from tests.support.waiting import Compared

Start = Callable[..., ReloaderProcess]
Backends = Callable[..., list[HttpBackend]]
KEY = "/fluster/services/{}/instances/{}"


def test_invalid_template_output_is_rejected_and_the_old_config_keeps_serving(
    etcd: Etcd, start_reloader: Start, backends: Backends, tmp_path: Path
) -> None:
    a, b, c = backends(3)
    templates = tmp_path / "templates"
    templates.mkdir()
    # Valid with one service, invalid HAProxy config as soon as there are two.
    defaults = (DEFAULT_TEMPLATES / "defaults.j2").read_text()
    two = '{% if backends | selectattr("service") | list | length > 1 %}'
    (templates / "defaults.j2").write_text(defaults + two + "\n    no-such-keyword\n{% endif %}\n")
    etcd.put(KEY.format("web", "a"), a.json())
    # Without a backend pool: the new service below is a structural change.
    reloader = start_reloader("--templates", str(templates), "--http-pool", "0")
    reloader.wait_served("web.localhost", {a.ident})
    live = reloader.config

    etcd.put(KEY.format("api", "c"), c.json())
    wait_for(lambda: reloader.status()["failures"]["rejected"] >= 1, what="rejection")
    state = reloader.state_dir
    assert "no-such-keyword" in (state / "haproxy.cfg.rejected").read_text()
    assert "no-such-keyword" in (state / "haproxy.cfg.rejected.txt").read_text()
    assert reloader.config == live
    assert reloader.get("web.localhost") == (200, a.ident)
    assert reloader.get("api.localhost")[0] == 404

    # The next change retries; once the catalog renders valid again, it applies.
    etcd.delete(KEY.format("api", "c"))
    etcd.put(KEY.format("web", "b"), b.json())
    reloader.wait_served("web.localhost", {a.ident, b.ident})
    status, text = reloader.http_get("/metrics")
    assert status == 200
    assert 'reloader_apply_failures_total{reason="rejected"}' in text


def test_bad_options_exit_2_listing_every_problem(tmp_path: Path) -> None:
    env = {**os.environ, "RELOADER_STATUS_BIND": "nowhere", "RELOADER_STATE_DIR": str(tmp_path)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "reloader",
            "--http-bind",
            "x",
            "--max-removal-pct",
            "500",
            "--templates",
            str(tmp_path / "missing"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2
    for name in ("--http-bind", "--status-bind", "--max-removal-pct", "--templates"):
        assert name in result.stderr


HOSTILE = {
    KEY.format("web", "nl"): '{"host": "127.0.0.1\\nserver evil 6.6.6.6:80", "port": 80}',
    KEY.format("web", "hash"): '{"host": "127.0.0.1#evil", "port": 80}',
    KEY.format("web", "quote"): '{"host": "127.0.0.1", "port": 80, "version": "v\\"evil"}',
    KEY.format("web", "port0"): '{"host": "127.0.0.1", "port": 0}',
    KEY.format("web", "port-big"): "127.0.0.1:65536",
    KEY.format("web", "huge"): json.dumps({"host": "127.0.0.1", "port": 80, "node": "e" * 9000}),
    KEY.format("web", "evil name"): '{"host": "127.0.0.1", "port": 80}',
    KEY.format("Evil_Service", "x"): '{"host": "127.0.0.1", "port": 80}',
    "/fluster/services/api/spec": '{"hosts": ["api.example.com\\n    bind :1"]}',
    KEY.format("web", "weight"): '{"host": "127.0.0.1", "port": 80, "weight": 1000}',
}


def test_hostile_records_never_reach_haproxy_cfg(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    (a,) = backends(1)
    etcd.put(KEY.format("web", "good"), a.json())
    for key, value in HOSTILE.items():
        etcd.put(key, value)
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    wait_for(lambda: reloader.status()["rejected_records"] == len(HOSTILE), what="rejections")
    config = reloader.config
    for needle in ("evil", "6.6.6.6", "65536", "eeee", "bind :1", "1000", "Evil"):
        assert needle not in config
    assert config.count("\n    server ") == 1


def test_an_invalid_spec_over_a_good_one_keeps_it_and_is_counted(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    """The promotion in the good spec stays in force (v2 is not routed again), and the
    kept spec is counted in /status and /metrics (`reloader_specs_kept_total`)."""
    a, b = backends(2)
    spec = "/fluster/services/web/spec"
    etcd.put(spec, json.dumps({"active_version": "v1"}))
    etcd.put(KEY.format("web", "a"), a.json(version="v1"))
    etcd.put(KEY.format("web", "b"), b.json(version="v2"))
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    assert reloader.metrics()["reloader_specs_kept_total"] == 0

    etcd.put(spec, '{"active_version": 7}')
    wait_for(
        lambda: Compared("specs_kept_total", reloader.status()["specs_kept_total"], 1),
        what="the invalid spec answered by keeping the good one",
    )
    wait_for(
        lambda: Compared("metric", reloader.metrics()["reloader_specs_kept_total"], 1),
        what="reloader_specs_kept_total 1 on /metrics",
    )
    status = reloader.status()
    assert "the last good spec is kept" in status["rejected"][spec], status["rejected"]
    web = status["services"]["web"]
    assert (web["active_version"], web["routed"]) == ("v1", ["a"]), web
    reloader.wait_served("web.localhost", {a.ident})


def test_compaction_while_away_resyncs_to_exactly_etcd(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    a, b, c = backends(3)
    etcd.put(KEY.format("web", "a"), a.json())
    etcd.put(KEY.format("web", "b"), b.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident, b.ident})
    assert reloader.proc is not None
    reloader.proc.send_signal(signal.SIGSTOP)
    try:
        etcd.restart(etcd.members[0])  # breaks the watch stream before the changes
        etcd.wait_healthy()
        etcd.delete(KEY.format("web", "a"))  # a delete the resync must not miss
        etcd.put(KEY.format("web", "c"), c.json())
        etcd.compact()
    finally:
        reloader.proc.send_signal(signal.SIGCONT)
    reloader.wait_served("web.localhost", {b.ident, c.ident}, timeout=30)
    in_etcd = sorted(
        key.rsplit("/", 1)[1]
        for key in etcd.ctl(
            "get", "--prefix", "--keys-only", "/fluster/services/web/"
        ).stdout.split()
    )
    assert in_etcd == ["b", "c"]
    wait_for(
        lambda: Compared(
            "reloader's instances",
            sorted(reloader.status()["services"]["web"]["instances"]),
            in_etcd,
        ),
        what="reloader state equal to etcd",
    )
    servers = reloader.admin("show servers state be_web")
    assert " b 127.0.0.1 " in servers and " c 127.0.0.1 " in servers
    # Out of rotation at once; deleted once HAProxy has let go of its idle connections.
    wait_for(
        lambda: " a 127.0.0.1 " not in reloader.admin("show servers state be_web"),
        timeout=15,
        what="server a deleted",
    )
    relists = [line for line in reloader.log().splitlines() if "listing again" in line]
    assert any("/fluster/services/" in line for line in relists), relists  # not only certs/


def test_render_once_prints_the_config(etcd: Etcd, backends: Backends, tmp_path: Path) -> None:
    (a,) = backends(1)
    etcd.put(KEY.format("web", "a"), a.json())
    env = {**os.environ, "ETCD_ENDPOINTS": etcd.endpoints, "RELOADER_STATE_DIR": str(tmp_path)}
    exe = shutil.which("reloader", path=str(Path(sys.executable).parent)) or "reloader"
    result = subprocess.run(
        [exe, "render", "--once", "--http-bind", "127.0.0.1:8080"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert f"server a 127.0.0.1:{a.port} weight 100" in result.stdout
    assert "bind 127.0.0.1:8080" in result.stdout
    # The routes the frontend looks up are shown too, as comments (a reloader writes them
    # to routes.map), so the printed text is still a config `haproxy -c` reads.
    assert re.search(r"^#   web\.localhost/ \S+$", result.stdout, re.M), result.stdout[-400:]


def test_restart_without_etcd_serves_the_previous_config(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    a, b = backends(2)
    etcd.put(KEY.format("web", "a"), a.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    assert reloader.stop() == 0
    etcd.stop()
    reloader.start()  # same state dir; etcd is down
    reloader.wait_served("web.localhost", {a.ident})
    assert "config of the previous run" in reloader.log()
    etcd.members[0].start(etcd.initial_cluster, state="existing")
    etcd.wait_healthy()
    etcd.put(KEY.format("web", "b"), b.json())
    reloader.wait_served("web.localhost", {a.ident, b.ident}, timeout=20)


def test_a_reload_haproxy_cannot_take_restores_the_last_good_config(
    etcd: Etcd, start_reloader: Start, backends: Backends, tmp_path: Path
) -> None:
    a, b = backends(2)
    # `haproxy -c` does not bind, so a TCP frontend on an address this host does not
    # have passes the check and fails the reload (EADDRNOTAVAIL): the path under test.
    templates = tmp_path / "templates"
    templates.mkdir()
    frontends = (DEFAULT_TEMPLATES / "frontends.j2").read_text()
    bind = "bind {{ bind((settings.http_bind[0], route.port)) }}"
    assert bind in frontends
    (templates / "frontends.j2").write_text(
        frontends.replace(bind, "bind 192.0.2.1:{{ route.port }}")
    )
    etcd.put(KEY.format("web", "a"), a.json())
    reloader = start_reloader("--templates", str(templates))
    reloader.wait_served("web.localhost", {a.ident})
    live = reloader.config
    etcd.put(KEY.format("db", "x"), a.json())
    # The port comes from free_port(): should another process take it first, the edge
    # leaves db out ("port in use") instead of trying the reload; then try a fresh one.
    for _ in range(PORT_ATTEMPTS):
        etcd.put("/fluster/services/db/spec", json.dumps({"mode": "tcp", "port": free_port()}))
        outcome = wait_for(
            lambda: (
                "reload failed"
                if reloader.status()["failures"]["reload"] >= 1
                else "port taken"
                if any(s["kind"] == "port" for s in reloader.status()["skipped_services"])
                else None
            ),
            timeout=30,
            what="a failed reload (or db left out for a taken port)",
        )
        if outcome == "reload failed":
            break
    assert outcome == "reload failed", f"db's port was taken {PORT_ATTEMPTS} times"
    # The spec and the instance may make two attempts: while the second one runs, the
    # candidate stands in the live file for a moment. What matters is that it goes back.
    wait_for(
        lambda: Compared("live config vs the last good one", reloader.config, live),
        timeout=30,
        what="the last good config restored",
    )
    assert reloader.get("web.localhost") == (200, a.ident)
    # One refused service does not freeze the edge: other membership changes apply.
    etcd.put(KEY.format("web", "b"), b.json())
    reloader.wait_served("web.localhost", {a.ident, b.ident}, timeout=20)
    assert "tcp_db" not in reloader.config
    # Once the bad spec is gone, the next change applies as a whole.
    etcd.delete("/fluster/services/db/spec")
    etcd.delete(KEY.format("db", "x"))
    etcd.put(KEY.format("api", "y"), b.json())
    reloader.wait_served("api.localhost", {b.ident}, timeout=20)
    assert reloader.status()["haproxy_up"]


def test_a_haproxy_left_by_a_killed_reloader_is_taken_over(
    etcd: Etcd,
    start_reloader: Callable[..., ReloaderProcess],
    backends: Callable[..., list[HttpBackend]],
) -> None:
    """SIGKILL of the reloader outside a cgroup leaves its HAProxy running; the next
    reloader on the same state dir must not serve beside it forever."""
    (a,) = backends(1)
    etcd.put(KEY.format("web", "a"), a.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    orphan = reloader.haproxy_pid()
    assert reloader.proc is not None
    reloader.proc.kill()
    reloader.proc.wait(10)
    assert reloader.get("web.localhost") == (200, a.ident)  # the orphan still serves

    reloader.start()
    assert reloader.haproxy_pid() != orphan
    # The very socket the orphan serves on (not a second one beside it, whose closing
    # would reset the connections queued on the orphan's): root here has ptrace rights.
    assert "took over the HTTP socket of the haproxy left behind" in reloader.log()
    wait_for(lambda: not Path(f"/proc/{orphan}").exists(), timeout=10, what="orphan gone")
    assert reloader.get("web.localhost") == (200, a.ident)
