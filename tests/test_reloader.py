"""The reloader against real etcd, real HAProxy and real HTTP backends on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.support.etcd import Etcd, wait_for
from tests.support.faults import Load
from tests.support.haproxy import HttpBackend, ReloaderProcess

Start = Callable[..., ReloaderProcess]
Backends = Callable[..., list[HttpBackend]]
KEY = "/fluster/services/{}/instances/{}"


async def test_leased_record_serves_and_plain_address_works(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    a, b = backends(2)
    lease = etcd.grant(30)
    etcd.put(KEY.format("web", "a"), a.json(version="v1"), lease=lease)
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    # A Host header with a port routes the same way.
    assert reloader.get(f"web.localhost:{reloader.http_port}") == (200, a.ident)
    etcd.put(KEY.format("web", "b"), b.address)  # plain ip:port, as a shell sidekick writes
    reloader.wait_served("web.localhost", {a.ident, b.ident})
    assert reloader.get("nope.localhost")[0] == 404
    etcd.ctl("lease", "revoke", lease, check=True)
    reloader.wait_served("web.localhost", {b.ident})


def test_a_removed_server_holding_a_request_does_not_keep_the_files_behind(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    """A removed server HAProxy cannot delete yet (a request is in flight on it: left in
    maintenance, the delete retried every second) once kept the reloader from ever writing
    the files for the runtime changes: a reload or restart would have brought it back."""
    (b,) = backends(1)
    hung = socket.create_server(("127.0.0.1", 0))  # accepts, reads, never answers
    held: list[socket.socket] = []
    client = None
    try:
        etcd.put(
            KEY.format("web", "a"), json.dumps({"host": "127.0.0.1", "port": hung.getsockname()[1]})
        )
        etcd.put(KEY.format("web", "b"), b.json())
        reloader = start_reloader()
        wait_for(lambda: "server a " in reloader.config and "server b " in reloader.config)
        hung.settimeout(0.2)

        def a_request_held_on_a() -> bool:
            nonlocal client
            client = socket.create_connection(("127.0.0.1", reloader.http_port), timeout=5)
            client.sendall(b"GET / HTTP/1.1\r\nHost: web.localhost\r\n\r\n")
            try:
                held.append(hung.accept()[0])
                return True
            except TimeoutError:
                client.close()  # answered by b: try again
                return False

        wait_for(a_request_held_on_a, what="a request routed to the server that never answers")
        etcd.delete(KEY.format("web", "a"))
        wait_for(
            lambda: "server still busy, left in maintenance" in reloader.log(),
            what="the delete refused while the request is in flight",
        )
        wait_for(
            lambda: "server a " not in reloader.config,
            timeout=15,
            what="the config file without a (WRITE_MAX is 5 s)",
        )
        assert "server b 127.0.0.1:" in reloader.config
    finally:
        for sock in [*held, hung, *([client] if client else [])]:
            sock.close()


async def test_membership_change_uses_the_runtime_api_new_tcp_service_reloads(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    a, b, c = backends(3)
    etcd.put(KEY.format("web", "a"), a.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    workers = reloader.workers()
    etcd.put(KEY.format("web", "b"), b.json())
    reloader.wait_served("web.localhost", {a.ident, b.ident})
    etcd.delete(KEY.format("web", "a"))
    reloader.wait_served("web.localhost", {b.ident})
    assert reloader.workers() == workers, "a membership change must not reload"
    assert reloader.metrics()["reloader_admin_connects_total"] == 1, "one kept connection"
    # The file follows, so that a later reload reproduces the state.
    wait_for(lambda: "server a " not in reloader.config, what="config file written")
    assert "server b 127.0.0.1:" in reloader.config
    assert reloader.status()["applies"]["runtime"] >= 2

    # A health-checked service cannot use a pool backend (no option httpchk there).
    etcd.put("/fluster/services/api/spec", json.dumps({"check": {"path": "/"}}))
    etcd.put(KEY.format("api", "c"), c.json())
    reloader.wait_served("api.localhost", {c.ident})
    assert reloader.workers() != workers, "a new health-checked service needs a reload"
    wait_for(lambda: reloader.status()["applies"]["reload"] >= 1, what="reload counted")
    # The reload reproduced the runtime API's work.
    reloader.wait_served("web.localhost", {b.ident})
    # A runtime change after the reload reaches the new worker (a connection kept from
    # before would reach the old, leaving one).
    reloads = reloader.status()["applies"]["reload"]
    etcd.put(KEY.format("web", "a"), a.json())
    reloader.wait_served("web.localhost", {a.ident, b.ident})
    assert reloader.status()["applies"]["reload"] == reloads, "a runtime change"
    assert reloader.metrics()["reloader_admin_connects_total"] == 2
    # `fluster promote` learns from this key that the edge applied the change.
    last = etcd.ctl("get", "-w", "json", KEY.format("api", "c")).stdout
    revision = int(json.loads(last)["kvs"][0]["mod_revision"])

    def published() -> int:
        out = etcd.ctl("get", "--print-value-only", "/fluster/reloaders/edge-test").stdout
        return int(json.loads(out)["applied_revision"]) if out.strip() else 0

    wait_for(lambda: published() >= revision, what="applied revision published")
    lease = etcd.ctl("get", "-w", "json", "/fluster/reloaders/edge-test").stdout
    assert json.loads(lease)["kvs"][0].get("lease"), "the status key is bound to a lease"
    metrics = reloader.metrics()
    assert metrics['reloader_applies_total{kind="runtime"}'] >= 2
    assert metrics["reloader_applied_revision"] >= revision
    assert reloader.http_get("/")[1].count("web") >= 1


async def test_haproxy_killed_is_back_within_a_second(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    (a,) = backends(1)
    etcd.put(KEY.format("web", "a"), a.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    old = reloader.haproxy_pid()
    os.kill(old, signal.SIGKILL)
    started = time.monotonic()
    wait_for(
        lambda: reloader.haproxy_pid() != old and reloader.get("web.localhost")[1] == a.ident,
        timeout=5,
        interval=0.01,
        what="haproxy restarted",
    )
    assert time.monotonic() - started < 1.0
    assert reloader.status()["haproxy_restarts"] == 1


def test_a_killed_haproxy_worker_refuses_no_connection(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    """The HTTP port is the reloader's socket, lent to HAProxy (`bind fd@N`): when the
    worker dies, connections wait in the socket's backlog for the next HAProxy instead of
    being refused (before: every attempt in the ~0.2-0.4 s restart was refused)."""
    (a,) = backends(1)
    etcd.put(KEY.format("web", "a"), a.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    assert "bind fd@" in reloader.config
    load = Load(reloader.http_port, "web.localhost", threads=4, pause=0.0).start()
    try:
        wait_for(lambda: load.ok > 200, timeout=20, what="load running")
        old = reloader.haproxy_pid()
        os.kill(reloader.workers()[0], signal.SIGKILL)
        wait_for(lambda: reloader.haproxy_pid() != old, timeout=10, what="haproxy restarted")
        served = load.ok
        wait_for(lambda: load.ok > served + 500, timeout=20, what="load served after")
    finally:
        load.stop()
    # What was in flight on the dead worker may fail: at most one request per thread.
    assert len(load.failures) <= 4, load.summary()


async def test_a_haproxy_restarted_from_files_that_lag_gets_the_runtime_changes_again(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    """The files for runtime changes are written once the catalog is quiet (or at the
    latest 5 s after the first change they lack). A HAProxy that dies meanwhile comes
    back from files without the latest servers: the reloader must add them again."""
    a, b, c = backends(3)
    etcd.put(KEY.format("web", "a"), a.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    # Keep the catalog busy, so the files stay behind HAProxy's memory for up to 5 s.
    stop = threading.Event()

    def busy() -> None:
        while not stop.wait(0.1):
            etcd.put(KEY.format("noise", "x"), c.json())

    noise = threading.Thread(target=busy, daemon=True)
    noise.start()
    try:
        etcd.put(KEY.format("web", "b"), b.json())
        reloader.wait_served("web.localhost", {a.ident, b.ident})
        assert "server b " not in reloader.config, "written before the catalog was quiet"
        old = reloader.haproxy_pid()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: reloader.haproxy_pid() != old, timeout=10, what="haproxy restarted")
        reloader.wait_served("web.localhost", {a.ident, b.ident}, timeout=10)
    finally:
        stop.set()
        noise.join()
    assert reloader.status()["haproxy_restarts"] == 1
    # Once the catalog is quiet, the files catch up.
    wait_for(lambda: "server b " in reloader.config, what="b written to the config file")


async def test_sigterm_stops_gracefully_and_a_missing_haproxy_exits_non_zero(
    etcd: Etcd, start_reloader: Start
) -> None:
    reloader = start_reloader()
    assert reloader.http_get("/healthz")[0] == 200
    pid = reloader.haproxy_pid()
    assert reloader.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "task ended unexpectedly" not in reloader.log(), "a graceful stop is no death"
    stale = start_reloader("--sync-max-age", "0.001")  # etcd's word is always too old
    status, text = stale.http_get("/healthz")
    assert status == 503 and "stale" in text
    broken = start_reloader("--haproxy", "/nonexistent/haproxy", wait=False)
    assert broken.proc is not None
    assert broken.proc.wait(20) == 1
    assert "cannot start HAProxy" in broken.log()


async def test_blast_radius_guard_holds_mass_removals_but_not_promotions(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    apps = backends(4)
    for n, app in enumerate(apps):
        etcd.put(KEY.format("web", f"{'b' if n else 'a'}{n}"), app.json(version="v1"))
    reloader = start_reloader("--removal-hold", "2")
    everyone = {app.ident for app in apps}
    reloader.wait_served("web.localhost", everyone)
    # Three of four at once (one etcd revision, as when leases expire together). Removals
    # that trickle in over several applies count towards the share, but one already
    # applied is never put back (tests/test_reloader_units.py).
    etcd.delete(KEY.format("web", "b"), prefix=True)
    held = wait_for(
        lambda: (s := reloader.status())["held_removals"] == 3 and s, what="removals held"
    )
    left = {
        name: i["hold_left_seconds"]
        for name, i in held["services"]["web"]["instances"].items()
        if i["held"]
    }
    assert sorted(left) == ["b1", "b2", "b3"], held["services"]["web"]
    assert all(0 <= t <= 2 for t in left.values()), left
    assert reloader.served_by("web.localhost", 12) == everyone
    assert "blast-radius guard" in reloader.log()
    reloader.wait_served("web.localhost", {apps[0].ident})  # released after the hold

    # A promotion removes most servers at once, on purpose: applied without a hold.
    for n in (1, 2, 3):
        etcd.put(KEY.format("web", f"b{n}"), apps[n].json(version="v2"))
    reloader.wait_served("web.localhost", everyone)
    etcd.put("/fluster/services/web/spec", json.dumps({"active_version": "v2"}))
    reloader.wait_served("web.localhost", {apps[1].ident, apps[2].ident, apps[3].ident})
    guard_lines = reloader.log().count("blast-radius guard")
    etcd.put("/fluster/services/web/spec", json.dumps({"active_version": "v1"}))
    reloader.wait_served("web.localhost", {apps[0].ident})
    assert reloader.log().count("blast-radius guard") == guard_lines, "a promotion is not held"


async def test_health_checked_servers_are_added_and_changed_at_runtime(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    a, b, c = backends(3)
    etcd.put("/fluster/services/web/spec", json.dumps({"check": {"path": "/", "interval_ms": 200}}))
    etcd.put(KEY.format("web", "a"), a.json())
    reloader = start_reloader()
    reloader.wait_served("web.localhost", {a.ident})
    workers = reloader.workers()
    etcd.put(KEY.format("web", "b"), b.json())
    reloader.wait_served("web.localhost", {a.ident, b.ident})
    assert reloader.workers() == workers
    # Weight and address changes of existing servers go through the runtime API too.
    etcd.put(KEY.format("web", "a"), a.json(weight=7))
    wait_for(
        lambda: " a 127.0.0.1 2 0 7 " in reloader.admin("show servers state be_web"),
        what="weight 7",
    )
    etcd.put(KEY.format("web", "b"), c.json())
    reloader.wait_served("web.localhost", {a.ident, c.ident})
    assert reloader.workers() == workers
    c.stop()  # the health check takes it out of rotation
    reloader.wait_served("web.localhost", {a.ident})
