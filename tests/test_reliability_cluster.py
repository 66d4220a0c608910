"""R1-R3: the edge (reloader + HAProxy) and the sidekicks when etcd loses members,
loses everything, or compacts the history a watch needs.

Real processes throughout: etcd members, `reloader run` with its HAProxy, static
`sidekick`s, HTTP backends, and a bounded client load through HAProxy (threads, so a
blocking etcdctl call in the test is never mistaken for an HAProxy stall). "HAProxy's
servers" are read from HAProxy itself (`show servers state` on the admin socket).

R2's outage lasts FLUSTER_R2_OUTAGE seconds (default 20).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support.etcd import Etcd, wait_for
from tests.support.faults import Load, TcpProxy, service_servers
from tests.support.haproxy import HttpBackend, ReloaderProcess
from tests.support.sidekick import Sidekicks
from tests.support.waiting import Compared

pytestmark = pytest.mark.slow

PREFIX = "/fluster"
R2_OUTAGE = float(os.environ.get("FLUSTER_R2_OUTAGE", "20"))


def etcd_instances(etcd: Etcd, service: str, endpoints: str | None = None) -> dict[str, str]:
    """instance name -> "host:port" of the `up` records of `service`, read from etcd."""
    prefix = f"{PREFIX}/services/{service}/instances/"
    out = etcd.ctl("get", "--prefix", prefix, endpoints=endpoints, check=True).stdout.splitlines()
    result = {}
    for key, value in zip(out[::2], out[1::2], strict=True):
        record = json.loads(value) if value.startswith("{") else None
        if record is None:
            result[key[len(prefix) :]] = value
        elif record.get("state", "up") == "up":
            result[key[len(prefix) :]] = f"{record['host']}:{record['port']}"
    return result


def served(reloader: ReloaderProcess, service: str) -> set[str]:
    servers = service_servers(reloader.state_dir, service)
    return {f"{host}:{port}" for host, port in servers}


def converged(reloader: ReloaderProcess, etcd: Etcd, services: tuple[str, ...]) -> Compared:
    """HAProxy's servers against etcd's `up` records, per service (falsy while they differ)."""
    return Compared(
        "HAProxy vs etcd",
        {s: served(reloader, s) for s in services},
        {s: set(etcd_instances(etcd, s).values()) for s in services},
    )


class Watcher:
    """Polls HAProxy's server count in a thread and keeps the lowest seen."""

    def __init__(self, reloader: ReloaderProcess, service: str) -> None:
        self.reloader, self.service = reloader, service
        self.lowest: int | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                count = len(served(self.reloader, self.service))
            except OSError:
                self.errors += 1  # a reload swaps the socket: not a lost server
                continue
            self.lowest = count if self.lowest is None else min(self.lowest, count)

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join(5)
        return self.lowest


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Callable[..., ReloaderProcess]]:
    """`edge(endpoints, *args)`: a reloader (+ HAProxy) talking to `endpoints`."""
    started: list[ReloaderProcess] = []

    def start(endpoints: str, *args: str) -> ReloaderProcess:
        # ReloaderProcess only reads `.endpoints` from its etcd: point it where we want.
        target = SimpleNamespace(endpoints=endpoints)
        proc = ReloaderProcess(target, tmp_path / f"edge{len(started)}", *args)  # type: ignore[arg-type]
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def http_backends() -> Iterator[Callable[[int], list[HttpBackend]]]:
    started: list[HttpBackend] = []

    def start(count: int) -> list[HttpBackend]:
        new = [HttpBackend(f"app-{len(started) + i}") for i in range(count)]
        started.extend(new)
        return new

    yield start
    for backend in started:
        backend.stop()


# -- R3 ----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_r3_compaction_while_the_reloader_is_cut_off_ends_equal_to_etcd(
    etcd: Etcd,
    edge: Callable[..., ReloaderProcess],
    http_backends: Callable[[int], list[HttpBackend]],
) -> None:
    """Changes before, during and after a compaction the reloader's watch must resume
    across: it relists (deletes included) and HAProxy ends with exactly etcd's servers."""
    apps = http_backends(9)
    key = f"{PREFIX}/services/{{}}/instances/{{}}".format
    for i in range(4):
        etcd.put(key("web", f"w{i}"), apps[i].address)
    for i in range(4, 6):
        etcd.put(key("api", f"a{i}"), apps[i].address)
    proxy = TcpProxy(("127.0.0.1", etcd.members[0].client_port))
    try:
        reloader = edge(proxy.endpoint)
        wait_for(lambda: converged(reloader, etcd, ("web", "api")), what="first sync")
        etcd.put(key("web", "w0"), apps[6].address)  # applied through the live watch
        wait_for(lambda: converged(reloader, etcd, ("web", "api")), what="watch works")
        load = Load(reloader.http_port, "web.localhost", threads=2, max_seconds=60).start()

        proxy.cut()  # the reloader alone loses etcd; the registry keeps changing
        wait_for(lambda: "watch interrupted" in reloader.log(), timeout=15, what="noticed")
        etcd.delete(key("web", "w1"))  # a delete the relist must not miss
        etcd.put(key("web", "w4"), apps[7].address)
        etcd.put(key("api", "a4"), apps[8].address)  # an address change
        etcd.delete(key("api", "a5"))
        etcd.put(key("shop", "s0"), apps[5].address)  # a new service
        etcd.compact()
        etcd.put(key("web", "w5"), apps[1].address)  # after the compaction point
        proxy.heal()

        wait_for(lambda: "watch history compacted" in reloader.log(), timeout=20, what="relist")
        wait_for(
            lambda: converged(reloader, etcd, ("web", "api", "shop")),
            timeout=10,
            what="HAProxy equal to etcd after the resync",
        )
        etcd.delete(key("web", "w2"))  # and the new watch carries on
        wait_for(lambda: converged(reloader, etcd, ("web", "api", "shop")), what="watching")
        load.stop()
        assert load.failures == [], load.summary()
        assert served(reloader, "web") == {apps[i].address for i in (6, 3, 7, 1)}
        status = reloader.status()
        assert status["failures"] == {"rejected": 0, "reload": 0, "render": 0}, status
        # One relist of the services (the certificate watch relists its own prefix too).
        relists = [line for line in reloader.log().splitlines() if "history compacted" in line]
        assert len([line for line in relists if "/fluster/services/" in line]) == 1, relists
        assert reloader.metrics()["reloader_catalog_resyncs_total"] == 1
    finally:
        proxy.close()


# -- R1 and R2: a 3-member cluster, static sidekicks, load through HAProxy ----------------


class Fleet:
    """Backends, each registered by its own static sidekick, and the edge in front."""

    def __init__(self, etcd: Etcd, root: Path, backends: Callable[[int], list[HttpBackend]]):
        self.etcd, self.root, self.backends = etcd, root, backends
        self.sidekicks = Sidekicks(etcd, root / "sidekicks")
        (root / "sidekicks").mkdir(parents=True, exist_ok=True)
        self.apps: dict[str, HttpBackend] = {}

    def add(self, ttl: int = 5) -> str:
        (app,) = self.backends(1)
        name = f"n1-127.0.0.1-{app.port}"
        self.sidekicks.start(
            "--service", "web", "--address", app.address, "--node", "n1",
            "--ttl", str(ttl), "--drain-seconds", "0.5",
        )  # fmt: skip
        self.apps[name] = app
        return name

    def key(self, name: str) -> str:
        return f"{PREFIX}/services/web/instances/{name}"

    def leases(self) -> dict[str, int]:
        return {name: self.sidekicks.lease_of(self.key(name)) for name in self.apps}

    def registered(self) -> set[str]:
        return set(etcd_instances(self.etcd, "web"))

    def close(self) -> None:
        self.sidekicks.close()


@pytest.fixture
def fleet(
    etcd3: Etcd, tmp_path: Path, http_backends: Callable[[int], list[HttpBackend]]
) -> Iterator[Fleet]:
    f = Fleet(etcd3, tmp_path, http_backends)
    try:
        yield f
    finally:
        f.close()


@pytest.mark.timeout(120)
def test_r1_leader_killed_under_load(
    etcd3: Etcd, fleet: Fleet, edge: Callable[..., ReloaderProcess]
) -> None:
    """0 failed requests, no registration lost or re-made, HAProxy equal to etcd after."""
    names = [fleet.add() for _ in range(3)]
    wait_for(lambda: fleet.registered() == set(names), what="registered")
    reloader = edge(etcd3.endpoints)
    wait_for(lambda: converged(reloader, etcd3, ("web",)), what="HAProxy has them")
    leases = fleet.leases()
    watcher = Watcher(reloader, "web")
    load = Load(reloader.http_port, "web.localhost", max_seconds=60).start()
    try:
        time.sleep(1.0)  # load before the fault
        leader = etcd3.leader()
        leader.kill()
        live = ",".join(m.endpoint for m in etcd3.members if m.running)
        # A registration right after the election: the sidekick and the reloader's
        # watch must both have found the surviving members.
        late = fleet.add()
        wait_for(
            lambda: late in etcd_instances(etcd3, "web", endpoints=live),
            timeout=15,
            what="registration after the leader died",
        )
        wait_for(
            lambda: served(reloader, "web") == set(etcd_instances(etcd3, "web", live).values()),
            timeout=20,
            what="HAProxy follows after the election",
        )
        time.sleep(6.0)  # more than a TTL on the survivors: keepalives must have moved too
        etcd3.restart(leader)
        etcd3.wait_healthy()
        time.sleep(1.0)
    finally:
        load.stop()
        lowest = watcher.stop()
    assert load.failures == [], load.summary()
    assert load.ok > 500
    assert lowest is not None and lowest >= 3, f"HAProxy dropped to {lowest} servers"
    # Nothing lost, nothing re-registered: the first three kept their original leases.
    assert {n: lease for n, lease in fleet.leases().items() if n in names} == leases
    assert fleet.registered() == {*names, late}
    wait_for(lambda: converged(reloader, etcd3, ("web",)), what="HAProxy equal to etcd")
    assert len(load.answers) == 4  # and every backend took traffic


@pytest.mark.timeout(120 + 2 * R2_OUTAGE)
def test_r2_whole_cluster_down(
    etcd3: Etcd, fleet: Fleet, edge: Callable[..., ReloaderProcess]
) -> None:
    """HAProxy serves the last good state through the outage with 0 failed requests;
    sidekicks are registered within 2 s of etcd's return; the reloader resyncs."""
    names = [fleet.add() for _ in range(3)]
    wait_for(lambda: fleet.registered() == set(names), what="registered")
    reloader = edge(etcd3.endpoints)
    wait_for(lambda: converged(reloader, etcd3, ("web",)), what="HAProxy has them")
    leases = fleet.leases()
    load = Load(reloader.http_port, "web.localhost", max_seconds=60 + R2_OUTAGE).start()
    try:
        time.sleep(1.0)
        for member in etcd3.members:
            member.stop()
        down = time.monotonic()
        late = fleet.add()  # starts while etcd is down: must register when it returns
        while time.monotonic() - down < R2_OUTAGE:
            assert served(reloader, "web") == {fleet.apps[n].address for n in names}
            time.sleep(1.0)
        for member in etcd3.members:
            member.start(etcd3.initial_cluster, state="existing")
        etcd3.wait_healthy()
        back = time.monotonic()
        wait_for(
            lambda: fleet.registered() == {*names, late},
            timeout=5,
            interval=0.05,
            what="every sidekick registered",
        )
        registered_in = time.monotonic() - back
        wait_for(lambda: converged(reloader, etcd3, ("web",)), timeout=15, what="resync")
        time.sleep(6.0)  # past a TTL: the keepalives are running again
    finally:
        load.stop()
    assert load.failures == [], load.summary()
    assert registered_in < 2.0, f"registered {registered_in:.2f}s after etcd returned"
    assert {n: lease for n, lease in fleet.leases().items() if n in names} == leases
    assert fleet.registered() == {*names, late}
    assert converged(reloader, etcd3, ("web",))
    status = reloader.status()
    assert status["failures"] == {"rejected": 0, "reload": 0, "render": 0}, status
    assert status["sync_age_seconds"] is not None and status["sync_age_seconds"] < 10
