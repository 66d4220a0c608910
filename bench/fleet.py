"""Fleet scale on one machine: many edges on one etcd, and a simulated fleet of hosts.

    python -m bench --only F1,F2,F3

- F1: 10 edges under a churn of 20 changes/s: the etcd writes their status keys cost
  (coalesced, reloader/publish.py) beside the applies they made (one write per apply
  before).
- F2: a new instance in rotation at every edge, 1 edge vs 5 edges, same run: put ->
  the server in every edge's HAProxy (read on each edge's admin socket).
- F3: 100 simulated host agents hold 10,000 instances in 1,000 services with the
  sidekick's own lease code (fluster.lease.Lease), pointing at the bench's listening
  backends (so HAProxy's checks pass, as in a healthy fleet), and 10 edges: time for
  every edge to serve every instance from cold, reloader RSS; then every lease revoked
  at once (what etcd restored from a snapshot without its leases leaves behind): time
  until all 10,000 are registered again, and etcd's request rate meanwhile.

- F4: 10 edges watching etcd directly vs through one `etcd grpc-proxy`, same churn:
  etcd's CPU, the watch streams etcd holds, and put -> in rotation at every edge.

Everything shares this machine's 2 cores: the edges, etcd, and the simulated agents.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.pipelines import cpu_seconds
from fluster import keys
from fluster.lease import Lease
from fluster.records import Instance
from fluster.store import EtcdSettings, Store, Unavailable, open_store
from testbed.etcd import Etcd
from testbed.reloader import ReloaderProcess, unix_command

PREFIX = "/fleet"


def admin_servers(edge: ReloaderProcess) -> set[str]:
    """Server names HAProxy has now, every backend (its admin socket; a new service may
    sit in a pooled backend under another name)."""
    try:
        text = unix_command(edge.state_dir / "admin.sock", "show servers state")
    except OSError:
        return set()
    names = set()
    for line in text.splitlines()[2:]:
        parts = line.split()
        if len(parts) > 3:
            names.add(parts[3])
    return names


def server_count(edge: ReloaderProcess) -> int:
    """How many servers HAProxy has, every backend (admin socket)."""
    try:
        text = unix_command(edge.state_dir / "admin.sock", "show servers state", timeout=30)
    except OSError:
        return 0
    return sum(1 for line in text.splitlines()[2:] if line.strip() and not line.startswith("#"))


@dataclass(frozen=True)
class Endpoints:
    """What ReloaderProcess needs of an etcd: where to reach it (a proxy, say)."""

    endpoints: str


def start_edges(etcd: Etcd | Endpoints, work: Path, n: int, tag: str) -> list[ReloaderProcess]:
    edges = [
        ReloaderProcess(etcd, work / f"{tag}{i}", "--id", f"{tag}{i}", prefix=PREFIX)  # type: ignore[arg-type]
        for i in range(n)
    ]
    for edge in edges:
        edge.start(wait=False)
    for edge in edges:
        deadline = time.monotonic() + 120
        while not _up(edge):
            if time.monotonic() > deadline:
                raise RuntimeError(f"edge {edge.state_dir} not up: {edge.log()[-800:]}")
            time.sleep(0.1)
    return edges


def _up(edge: ReloaderProcess) -> bool:
    try:
        return edge._up()
    except OSError:
        return False  # its status server is not listening yet


def stop_edges(edges: list[ReloaderProcess]) -> None:
    for edge in edges:
        edge.stop()


def etcd_counter(etcd: Etcd, name: str) -> float:
    """The sum of one etcd metric's series (its own /metrics)."""
    url = f"http://{etcd.members[0].endpoint}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:  # loopback only
        text = reply.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def edge_applies(edge: ReloaderProcess) -> float:
    metrics = edge.metrics()
    return sum(
        v for k, v in metrics.items() if k.startswith("reloader_applies_total") and "noop" not in k
    )


# -- F1 ------------------------------------------------------------------------------


@dataclass
class Bookkeeping:
    edges: int
    seconds: float
    changes: int
    status_writes: int
    applies: float


async def f1_bookkeeping(
    etcd: Etcd, store: Store, work: Path, edges_n: int = 10, rate: float = 20, seconds: float = 30
) -> Bookkeeping:
    service = "churn"
    for i in range(4):
        await store.put(keys.instance_key(PREFIX, service, f"base{i}"), f"127.0.0.1:{23000 + i}")
    edges = await asyncio.to_thread(start_edges, etcd, work, edges_n, "f1-")
    try:
        await asyncio.sleep(3)  # start-up writes done
        revision, _ = await store.get(keys.reloaders_prefix(PREFIX))
        applies0 = sum(await asyncio.to_thread(lambda: [edge_applies(e) for e in edges]))
        writes = 0

        async def count() -> None:
            nonlocal writes
            async for batch in store.watch(keys.reloaders_prefix(PREFIX), revision + 1):
                writes += sum(1 for ev in batch.events if ev.type == "put")

        counter = asyncio.create_task(count())
        started = time.monotonic()
        changes = 0
        key = keys.instance_key(PREFIX, service, "extra")
        while time.monotonic() - started < seconds:
            if changes % 2 == 0:
                await store.put(key, "127.0.0.1:23010")
            else:
                await store.delete(key)
            changes += 1
            await asyncio.sleep(max(0.0, started + changes / rate - time.monotonic()))
        await asyncio.sleep(1.0)  # the last coalesced writes land
        elapsed = time.monotonic() - started
        counter.cancel()
        applies1 = sum(await asyncio.to_thread(lambda: [edge_applies(e) for e in edges]))
        return Bookkeeping(edges_n, elapsed, changes, writes, applies1 - applies0)
    finally:
        await asyncio.to_thread(stop_edges, edges)


# -- F2 ------------------------------------------------------------------------------


@dataclass
class Rotation:
    one_edge_ms: list[float] = field(default_factory=list)
    five_edges_ms: list[float] = field(default_factory=list)


async def _rotation_trials(
    store: Store, edges: list[ReloaderProcess], trials: int, tag: str
) -> list[float]:
    service = f"rot{tag}"
    await store.put(keys.instance_key(PREFIX, service, f"{tag}-base"), "127.0.0.1:23100")
    for edge in edges:
        deadline = time.monotonic() + 30
        while f"{tag}-base" not in await asyncio.to_thread(admin_servers, edge):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service} never served at {edge.state_dir}")
            await asyncio.sleep(0.05)
    out = []
    for k in range(trials):
        name = f"{tag}-n{k}"
        started = time.monotonic()
        await store.put(keys.instance_key(PREFIX, service, name), f"127.0.0.1:{23200 + k}")
        pending = list(edges)
        while pending:
            pending = [e for e in pending if name not in admin_servers(e)]
            if time.monotonic() - started > 10:
                raise RuntimeError(f"{name} not in rotation after 10 s at {len(pending)} edges")
            if pending:
                await asyncio.sleep(0.0005)  # leave the cores to the edges between polls
        out.append((time.monotonic() - started) * 1000)
        await asyncio.sleep(0.2)
    return out


async def f2_rotation(etcd: Etcd, store: Store, work: Path, trials: int = 30) -> Rotation:
    result = Rotation()
    edges = await asyncio.to_thread(start_edges, etcd, work, 1, "f2a-")
    try:
        result.one_edge_ms = await _rotation_trials(store, edges, trials, "a")
    finally:
        await asyncio.to_thread(stop_edges, edges)
    edges = await asyncio.to_thread(start_edges, etcd, work, 5, "f2b-")
    try:
        result.five_edges_ms = await _rotation_trials(store, edges, trials, "b")
    finally:
        await asyncio.to_thread(stop_edges, edges)
    return result


# -- F3 ------------------------------------------------------------------------------


@dataclass
class FleetRun:
    agents: int
    instances: int
    services: int
    edges: int
    leases_per_agent: int = 1
    cold_seconds: float = 0.0
    edge_rss_mb: list[float] = field(default_factory=list)
    recovery_seconds: float = 0.0
    revoke_seconds: float = 0.0
    peak_requests_per_s: float = 0.0
    steady_requests_per_s: float = 0.0
    min_served_during: int = 0


class Agent:
    """A host agent's registrations under `leases` leases (the sidekick holds one per
    registration; one per agent is what this machine can simulate for 10,000)."""

    def __init__(
        self,
        store: Store,
        index: int,
        per_agent: int,
        services: int,
        ttl: int,
        leases: int,
        ports: list[int],
    ):
        self.leases = [Lease(store, ttl, name=f"agent{index}-{k}") for k in range(leases)]
        for j in range(per_agent):
            n = index * per_agent + j
            service = f"svc{n % services:04d}"
            record = Instance(host="127.0.0.1", port=ports[n % len(ports)])
            key = keys.instance_key(PREFIX, service, f"a{index}-{j}")
            self.leases[j % leases].set(key, record.to_json())

    def start(self) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(lease.run()) for lease in self.leases]


async def _count_instances(store: Store) -> int:
    return await store.count_prefix(keys.services_prefix(PREFIX))


async def f3_fleet(
    etcd: Etcd,
    work: Path,
    ports: list[int],
    agents_n: int = 100,
    per_agent: int = 100,
    services: int = 1000,
    edges_n: int = 10,
    ttl: int = 10,
    leases_per_agent: int = 1,
) -> FleetRun:
    run = FleetRun(agents_n, agents_n * per_agent, services, edges_n, leases_per_agent)
    settings = EtcdSettings(endpoints=etcd.endpoint_list, timeout=30.0)
    async with open_store(settings) as store:
        agents = [
            Agent(store, i, per_agent, services, ttl, leases_per_agent, ports)
            for i in range(agents_n)
        ]
        tasks = [t for a in agents for t in a.start()]
        try:
            deadline = time.monotonic() + 300
            while await _count_instances(store) < run.instances:
                if time.monotonic() > deadline:
                    raise RuntimeError("the simulated agents never registered everything")
                await asyncio.sleep(0.5)
            started = time.monotonic()
            edges = await asyncio.to_thread(start_edges, etcd, work, edges_n, "f3-")
            try:
                pending = list(edges)
                while pending:
                    counts = [await asyncio.to_thread(server_count, e) for e in pending]
                    pending = [e for e, c in zip(pending, counts, strict=True) if c < run.instances]
                    if time.monotonic() - started > 600:
                        raise RuntimeError(f"{len(pending)} edges not serving all after 600 s")
                    await asyncio.sleep(0.5)
                run.cold_seconds = time.monotonic() - started
                run.edge_rss_mb = [_rss_mb(e) for e in edges]
                handled = "grpc_server_msg_received_total"
                r0, t0 = etcd_counter(etcd, handled), time.monotonic()
                await asyncio.sleep(10)
                run.steady_requests_per_s = (etcd_counter(etcd, handled) - r0) / (
                    time.monotonic() - t0
                )
                # Every lease gone at once: what an etcd restored without its leases leaves.
                ids = [lease.id for a in agents for lease in a.leases if lease.id]
                lost = time.monotonic()
                await revoke_all(store, ids)
                run.revoke_seconds = time.monotonic() - lost
                last, peak, low = etcd_counter(etcd, handled), 0.0, run.instances
                while True:
                    await asyncio.sleep(1.0)
                    now = etcd_counter(etcd, handled)
                    peak, last = max(peak, now - last), now
                    low = min(low, await asyncio.to_thread(server_count, edges[0]))
                    if await _count_instances(store) >= run.instances:
                        break
                    if time.monotonic() - lost > 300:
                        raise RuntimeError("not registered again within 300 s")
                run.recovery_seconds = time.monotonic() - lost
                run.peak_requests_per_s = peak
                run.min_served_during = low
            finally:
                await asyncio.to_thread(stop_edges, edges)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return run


# -- F4 ------------------------------------------------------------------------------


@dataclass
class ProxyRun:
    edges: int
    seconds: float
    changes: int
    # "direct" / "proxy" -> figure
    etcd_cpu_pct: dict[str, float] = field(default_factory=dict)
    watchers: dict[str, float] = field(default_factory=dict)
    rotation_ms: dict[str, list[float]] = field(default_factory=dict)
    proxy_cpu_pct: float = 0.0
    resyncs: dict[str, float] = field(default_factory=dict)


async def f4_proxy(
    etcd: Etcd,
    store: Store,
    work: Path,
    port: int,
    edges_n: int = 10,
    seconds: float = 20,
    rate: float = 10,
) -> ProxyRun:
    run = ProxyRun(edges_n, seconds, 0)
    proxy = start_proxy(etcd, work, port)
    etcd_pid = etcd.members[0].proc.pid if etcd.members[0].proc else 0
    try:
        for way, target in (("direct", etcd), ("proxy", Endpoints(f"127.0.0.1:{port}"))):
            edges = await asyncio.to_thread(start_edges, target, work, edges_n, f"f4{way}-")
            try:
                await asyncio.sleep(5)  # start-up done
                resync0 = sum(_resyncs(e) for e in edges)
                watchers = etcd_counter(etcd, "etcd_debugging_mvcc_watcher_total")
                cpu0, p0, t0 = cpu_seconds(etcd_pid), cpu_seconds(proxy.pid), time.monotonic()
                latencies = await _rotation_trials(store, edges, int(seconds * rate / 2), way)
                elapsed = time.monotonic() - t0
                run.etcd_cpu_pct[way] = 100 * (cpu_seconds(etcd_pid) - cpu0) / elapsed
                if way == "proxy":
                    run.proxy_cpu_pct = 100 * (cpu_seconds(proxy.pid) - p0) / elapsed
                run.watchers[way] = watchers
                run.rotation_ms[way] = latencies
                run.resyncs[way] = sum(_resyncs(e) for e in edges) - resync0
                run.changes += len(latencies)
            finally:
                await asyncio.to_thread(stop_edges, edges)
    finally:
        proxy.terminate()
        proxy.wait(10)
    return run


def start_proxy(etcd: Etcd, work: Path, port: int) -> subprocess.Popen[bytes]:
    """`etcd grpc-proxy start` in front of `etcd` on 127.0.0.1:`port`."""
    with open(work / "grpc-proxy.log", "ab") as log:
        return subprocess.Popen(
            ["etcd", "grpc-proxy", "start", f"--endpoints={etcd.endpoints}",
             f"--listen-addr=127.0.0.1:{port}", f"--data-dir={work / 'proxy'}"],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip


def _resyncs(edge: ReloaderProcess) -> float:
    """Watches the edge had to open again (a stream that broke or went quiet)."""
    metrics = edge.metrics()
    return sum(v for k, v in metrics.items() if "reconnect" in k or "resync" in k)


async def revoke_all(store: Store, ids: list[int], at_once: int = 10) -> None:
    """Revoke every lease, `at_once` at a time, each retried while etcd is busy (a
    revoke deletes every key of its lease in one request)."""
    for start in range(0, len(ids), at_once):
        for attempt in range(10):
            try:
                await asyncio.gather(*(store.revoke(i) for i in ids[start : start + at_once]))
                break
            except Unavailable:
                if attempt == 9:
                    raise
                await asyncio.sleep(0.5)


def _rss_mb(edge: ReloaderProcess) -> float:
    assert edge.proc is not None
    for line in Path(f"/proc/{edge.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


async def _main(only: set[str], work: Path) -> None:
    etcd = Etcd(work / "etcd").start()
    try:
        async with open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as store:
            if "F1" in only:
                print(await f1_bookkeeping(etcd, store, work, seconds=10))
            if "F2" in only:
                r = await f2_rotation(etcd, store, work, trials=10)
                print(f"1 edge p50 {p50(r.one_edge_ms):.1f}, 5 edges {p50(r.five_edges_ms):.1f} ms")
            if "F3" in only:
                print(
                    await f3_fleet(etcd, work, agents_n=10, per_agent=100, services=100, edges_n=2)
                )
    finally:
        etcd.stop()


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
        asyncio.run(_main(set(sys.argv[1:]), Path(tmp)))
