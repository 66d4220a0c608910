"""The sidekick's lease lifecycle against a real etcd, in static mode (no Docker needed).

Static mode runs the same registration core as the Docker modes, so the etcd faults
(key deleted, etcd restarted, etcd frozen longer than the TTL), health gating,
retirement and SIGTERM draining are all tested here once, with real processes.
"""

from __future__ import annotations

import http.server
import json
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.etcd import Etcd, free_port, wait_for
from tests.support.sidekick import SidekickProcess, Sidekicks

TTL = "2"
KEY = "/fluster/services/web/instances/"


def events_named(proc: SidekickProcess, event: str) -> list[dict[str, object]]:
    return [e for e in proc.events() if e.get("event") == event]


def failed_checks(proc: SidekickProcess) -> int:
    return len(events_named(proc, "app check failed"))


def failed_watches(proc: SidekickProcess) -> int:
    return len(events_named(proc, "watch interrupted, resuming"))


def spec_events(proc: SidekickProcess) -> list[dict[str, object]]:
    return events_named(proc, "service spec")


def static(
    sidekicks: Sidekicks,
    *extra: str,
    port: int = 8080,
    version: str = "v1",
) -> tuple[str, SidekickProcess]:
    name = f"n1-127.0.0.1-{port}"
    proc = sidekicks.start(
        "--service",
        "web",
        "--address",
        f"127.0.0.1:{port}",
        "--node",
        "n1",
        "--ttl",
        TTL,
        "--drain-seconds",
        "0.5",
        "--app-version",
        version,
        *extra,
    )
    return name, proc


def test_registers_with_a_lease_and_checks_ok(sidekicks: Sidekicks) -> None:
    name, proc = static(sidekicks)
    inst = wait_for(lambda: sidekicks.instances("web").get(name), what="registration")
    assert (inst.host, inst.port, inst.version, inst.node, inst.state) == (
        "127.0.0.1",
        8080,
        "v1",
        "n1",
        "up",
    )
    assert sidekicks.lease_of(KEY + name) != 0
    # Kept alive: still there after two TTLs.
    time.sleep(4.5)  # the TTL passing is the point here, not synchronisation
    assert name in sidekicks.instances("web")
    assert wait_for(lambda: proc.check().returncode == 0, what="sidekick --check ok")
    assert proc.check(bare=True).returncode == 0


def test_key_deleted_comes_back_within_a_second(sidekicks: Sidekicks, etcd: Etcd) -> None:
    name, proc = static(sidekicks)
    wait_for(lambda: name in sidekicks.instances("web"), what="registration")
    deleted = time.time()
    etcd.delete(KEY + name)
    wait_for(lambda: name in sidekicks.instances("web"), timeout=5, what="re-registration")
    # The sidekick's own timestamps: a loaded machine slows etcdctl, not the sidekick.
    assert proc.logged_at("registered") - deleted < 1.0


def test_lease_revoked_gets_a_new_lease(sidekicks: Sidekicks, etcd: Etcd) -> None:
    name, proc = static(sidekicks)
    wait_for(lambda: name in sidekicks.instances("web"), what="registration")
    lease = sidekicks.lease_of(KEY + name)
    revoked = time.time()
    etcd.ctl("lease", "revoke", f"{lease:x}", check=True)
    wait_for(
        lambda: sidekicks.lease_of(KEY + name) not in (0, lease),
        timeout=5,
        what="registration under a new lease",
    )
    # At once, but for the hold-off the sidekick drew (up to TTL/3, --reregister-spread).
    proc.logged_at("lease expired, registering again")  # waits for the line
    lost = events_named(proc, "lease expired, registering again")[-1]
    holdoff = float(lost["after_seconds"])  # type: ignore[arg-type]
    assert 0 <= holdoff <= int(TTL) / 3
    assert proc.logged_at("registered") - revoked < holdoff + 1.0


def test_survives_an_etcd_restart(sidekicks: Sidekicks, etcd: Etcd) -> None:
    name, proc = static(sidekicks)
    wait_for(lambda: name in sidekicks.instances("web"), what="registration")
    etcd.restart(etcd.members[0])
    etcd.wait_healthy()
    wait_for(lambda: name in sidekicks.instances("web"), timeout=5, what="registered after restart")
    time.sleep(4.5)  # two TTLs: the keepalive must have resumed, or the lease expires
    assert name in sidekicks.instances("web")
    assert proc.proc.poll() is None


def test_etcd_frozen_longer_than_the_ttl(sidekicks: Sidekicks, etcd: Etcd) -> None:
    name, proc = static(sidekicks)
    wait_for(lambda: name in sidekicks.instances("web"), what="registration")
    member = etcd.members[0]
    member.pause()
    try:
        time.sleep(5)  # the fault: frozen for 2.5 TTLs
    finally:
        member.resume()
    wait_for(
        lambda: name in sidekicks.instances("web"),
        timeout=10,
        interval=0.1,
        what="registered again after the freeze",
    )
    time.sleep(4.5)  # and kept alive afterwards
    assert name in sidekicks.instances("web")
    assert proc.proc.poll() is None


def test_sigterm_drains_then_deregisters_and_exits_0(sidekicks: Sidekicks) -> None:
    name, proc = static(sidekicks, "--drain-seconds", "1.5")
    wait_for(lambda: name in sidekicks.instances("web"), what="registration")
    proc.send(signal.SIGTERM)
    inst = wait_for(lambda: sidekicks.instances("web").get(name), what="draining record")
    wait_for(
        lambda: sidekicks.instances("web").get(name, inst).state == "draining",
        timeout=2,
        interval=0.02,
        what="state draining",
    )
    wait_for(lambda: name not in sidekicks.instances("web"), what="deregistration")
    assert 1.5 <= proc.logged_at("deregistered") - proc.logged_at("draining") < 1.5 + 1
    assert proc.proc.wait(10) == 0
    assert proc.check().returncode != 0  # nothing running any more


class Health(http.server.BaseHTTPRequestHandler):
    ok = True

    def do_GET(self) -> None:
        self.send_response(200 if type(self).ok else 500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def app() -> Iterator[tuple[int, type[Health]]]:
    handler = type("AppHealth", (Health,), {"ok": True})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def test_registered_only_while_healthy(
    sidekicks: Sidekicks,
    app: tuple[int, type[Health]],
) -> None:
    port, handler = app
    name, _ = static(
        sidekicks,
        "--check",
        "http:/health",
        "--check-interval",
        "0.1",
        "--rise",
        "2",
        "--fall",
        "2",
        port=port,
    )
    wait_for(lambda: name in sidekicks.instances("web"), what="registered once healthy")
    for _ in range(2):  # flapping: each flip is followed through, both ways
        handler.ok = False
        wait_for(
            lambda: name not in sidekicks.instances("web"),
            timeout=4,
            what="deregistered when unhealthy",
        )
        handler.ok = True
        wait_for(
            lambda: name in sidekicks.instances("web"),
            timeout=4,
            what="registered again when healthy",
        )


def test_not_registered_while_the_app_does_not_answer(sidekicks: Sidekicks) -> None:
    port = free_port()  # nothing listens there
    name, proc = static(sidekicks, "--check", "tcp", "--check-interval", "0.1", port=port)
    wait_for(lambda: failed_checks(proc) >= 5, what="several failed checks")
    assert name not in sidekicks.instances("web")
    assert proc.check().returncode == 0  # unhealthy app, but the sidekick is doing its job


def test_retired_on_promotion_and_stays_retired(sidekicks: Sidekicks, etcd: Etcd) -> None:
    old, old_proc = static(sidekicks, port=8081, version="v1")
    wait_for(lambda: old in sidekicks.instances("web"), what="v1 registered")
    etcd.put("/fluster/services/web/spec", '{"active_version": "v1"}')
    # A new version starts before its promotion: it must register (or it could never be
    # promoted), even though the spec does not route it yet.
    new, _ = static(sidekicks, port=8082, version="v2")
    wait_for(lambda: new in sidekicks.instances("web"), what="v2 registered")
    etcd.put("/fluster/services/web/spec", '{"active_version": "v2", "history": ["v1"]}')
    wait_for(lambda: old not in sidekicks.instances("web"), timeout=4, what="v1 retired")
    assert new in sidekicks.instances("web")
    assert old_proc.logged("retired: traffic moved to another version")
    time.sleep(2.5)  # longer than a TTL and many retry periods: it stays away
    assert old not in sidekicks.instances("web")
    # A v1 sidekick starting after the promotion (v1 in history) never registers.
    late, late_proc = static(sidekicks, port=8083, version="v1")
    wait_for(
        lambda: late_proc.logged("retired: traffic moved to another version"),
        what="late v1 retired",
    )
    assert late not in sidekicks.instances("web")


def test_canary_version_is_not_retired(sidekicks: Sidekicks, etcd: Etcd) -> None:
    name, proc = static(sidekicks, version="v2")
    wait_for(lambda: name in sidekicks.instances("web"), what="registration")
    etcd.put(
        "/fluster/services/web/spec",
        '{"active_version": "v1", "canary": {"version": "v2", "weight": 10}}',
    )
    wait_for(
        lambda: any(e.get("canary_version") == "v2" for e in spec_events(proc)),
        what="the sidekick seeing the spec with its canary",
    )
    assert name in sidekicks.instances("web")
    assert not proc.logged("retired: traffic moved to another version")


def test_promotion_with_keep_old_retires_when_the_time_is_up(
    sidekicks: Sidekicks, etcd: Etcd
) -> None:
    name, proc = static(sidekicks, version="v1")
    new, _ = static(sidekicks, port=8082, version="v2")  # v2 up: v1 is no fallback
    wait_for(lambda: {name, new} <= set(sidekicks.instances("web")), what="registration")
    until = (datetime.now(UTC) + timedelta(seconds=3)).isoformat(timespec="seconds")
    spec = {"active_version": "v2", "history": ["v1"], "keep_old_until": until}
    etcd.put("/fluster/services/web/spec", json.dumps(spec))
    wait_for(lambda: proc.logged("superseded, kept for a rollback"), what="kept for rollback")
    assert name in sidekicks.instances("web")  # a rollback still finds it
    wait_for(lambda: name not in sidekicks.instances("web"), timeout=8, what="retired later")


def test_the_version_the_edge_falls_back_to_is_not_retired(
    sidekicks: Sidekicks, etcd: Etcd
) -> None:
    """Promoted to v2 while no v2 instance is up, the edge serves v1 (fluster.routing):
    past keep-old, v1 must stay registered, or the service routes to nothing. It
    retires once a v2 instance is up."""
    name, proc = static(sidekicks, version="v1")
    wait_for(lambda: name in sidekicks.instances("web"), what="registration")
    until = datetime.now(UTC) + timedelta(seconds=2)
    spec = {"active_version": "v2", "history": ["v1"], "keep_old_until": until.isoformat()}
    etcd.put("/fluster/services/web/spec", json.dumps(spec))
    wait_for(
        lambda: proc.logged("retirement held: the edge falls back to this version"),
        what="the retirement held",
    )
    # Not a synchronisation: keep-old must be over before "still registered" means much.
    time.sleep(max(0.0, (until - datetime.now(UTC)).total_seconds()) + 1.5)
    assert name in sidekicks.instances("web"), proc.log()[-3000:]
    assert not proc.logged("retired: traffic moved to another version")
    new, _ = static(sidekicks, port=8082, version="v2")
    wait_for(lambda: name not in sidekicks.instances("web"), timeout=8, what="v1 retired")
    assert new in sidekicks.instances("web")
    assert proc.logged("retired: traffic moved to another version")


def test_operator_drain_is_not_undone(sidekicks: Sidekicks, etcd: Etcd) -> None:
    name, proc = static(sidekicks)
    inst = wait_for(lambda: sidekicks.instances("web").get(name), what="registration")
    lease = sidekicks.lease_of(KEY + name)
    etcd.put(KEY + name, inst.replace(state="draining").to_json(), lease=f"{lease:x}")
    wait_for(
        lambda: proc.logged("drained by an operator; staying draining"),
        what="the sidekick seeing the operator's write",
    )
    etcd.delete(KEY + name)  # the sidekick puts it back, still draining
    back = wait_for(lambda: sidekicks.instances("web").get(name), what="re-registration")
    assert back.state == "draining"


def test_waits_for_etcd_that_is_down_at_start(sidekicks: Sidekicks, etcd: Etcd) -> None:
    member = etcd.members[0]
    member.stop()
    name, proc = static(sidekicks)
    wait_for(lambda: failed_watches(proc) >= 3, what="several failed attempts to reach etcd")
    assert proc.proc.poll() is None
    assert proc.check().returncode != 0  # not registered: --check says so
    member.start(etcd.initial_cluster, state="existing")
    etcd.wait_healthy()
    wait_for(lambda: name in sidekicks.instances("web"), timeout=5, what="registered")
    wait_for(lambda: proc.check().returncode == 0, what="--check ok")


def test_three_member_cluster_losing_the_leader(etcd3: Etcd, tmp_path: Path) -> None:
    runner = Sidekicks(etcd3, tmp_path)
    try:
        name, proc = static(runner)
        wait_for(lambda: name in runner.instances("web"), what="registration")
        leader = etcd3.leader()
        leader.stop()
        time.sleep(4.5)  # two TTLs without that member: keepalives go to the others
        assert name in runner.instances("web")
        etcd3.delete(KEY + name)
        wait_for(lambda: name in runner.instances("web"), timeout=3, what="re-registration")
        assert proc.proc.poll() is None
    finally:
        runner.close()


def test_sigterm_with_etcd_down_still_exits_in_bounded_time(
    sidekicks: Sidekicks, etcd: Etcd
) -> None:
    name, proc = static(sidekicks, "--drain-seconds", "1")
    wait_for(lambda: name in sidekicks.instances("web"), what="registration")
    etcd.members[0].stop()
    sent = time.monotonic()
    proc.send(signal.SIGTERM)
    assert proc.proc.wait(15) == 0
    assert time.monotonic() - sent < 1 + 5 + 2  # drain period + the shutdown margin
