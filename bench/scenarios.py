"""The rows: each scenario drives etcd and HAProxy and returns raw figures.

Shared by every row: one etcd (a real member, testbed/etcd.py), one backend process
(bench/backends.py), one bench-side Store for the writes. Every latency starts just
before the etcd put is sent and ends when the probe's response body names the new
backend, so it covers watch delivery, debounce, render, validation, apply and HAProxy
picking the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import adapter, haproxy
from bench import sidekick_footprint as footprint
from bench.adapter import Counts
from bench.backends import Backends
from bench.load import LoadResult, keepalive, new_connections
from bench.pipelines import Naive, Ours, Pipeline, rss_kb
from bench.probe import Probe
from fluster import keys
from fluster.store import Store
from reloader.state_dir import StateDir
from testbed.etcd import Etcd
from testbed.ports import PORT_ATTEMPTS, free_port, lost_a_port
from testbed.process import wait_or_kill

BASE_SERVERS = 1000
HEAVY, LIGHT = 256, 1  # new backend's weight vs the existing 1,000 (see P1 notes)


@dataclass
class Env:
    work: Path
    etcd: Etcd
    store: Store
    backends: Backends
    quick: bool
    base: list[int] = field(default_factory=list)  # the existing 1,000 servers
    p1: list[int] = field(default_factory=list)  # new servers in P1, cycled
    p2: list[int] = field(default_factory=list)  # new services in P2, cycled
    load: list[int] = field(default_factory=list)  # the service under load in P3

    def split_ports(self) -> None:
        ports = self.backends.ports
        self.base = ports[:BASE_SERVERS]
        self.p1 = ports[BASE_SERVERS : BASE_SERVERS + 50]
        self.p2 = ports[BASE_SERVERS + 50 : BASE_SERVERS + 100]
        self.load = ports[BASE_SERVERS + 100 : BASE_SERVERS + 104]


PORTS_NEEDED = BASE_SERVERS + 104


def instance(port: int, weight: int = 100, host: str = "127.0.0.1") -> str:
    return json.dumps({"host": host, "port": port, "weight": weight, "version": "v1"})


async def put_many(store: Store, items: list[tuple[str, str]], concurrency: int = 64) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(key: str, value: str) -> None:
        async with gate:
            await store.put(key, value)

    await asyncio.gather(*(one(k, v) for k, v in items))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class Latencies:
    samples: list[float] = field(default_factory=list)
    misses: int = 0  # trials where the new backend never answered within the limit
    budget_hit: bool = False  # stopped before the asked trials: the time budget ran out
    check_seconds: float | None = None  # `haproxy -c` of the live config, median of 5
    applied: Counts | None = None  # the pipeline's own counters over the trials
    reloaded: list[float] = field(default_factory=list)  # P2: the samples that took a reload
    pooled: list[float] = field(default_factory=list)  # P2: the others (runtime API only)

    @property
    def p50(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def p99(self) -> float | None:
        return percentile(self.samples, 99) if self.samples else None

    @property
    def worst(self) -> float | None:
        return max(self.samples) if self.samples else None


# -- pipelines --------------------------------------------------------------------------


def make_pipeline(kind: str, env: Env, prefix: str) -> Pipeline:
    cls = Ours if kind == "fluster" else Naive
    workdir = env.work / f"{kind}{prefix.replace('/', '-')}"
    workdir.mkdir(parents=True, exist_ok=True)
    return cls(workdir, env.etcd.endpoints, prefix, free_port(), free_port())


async def start(pipeline: Pipeline, within: float = 30.0) -> None:
    """Start the pipeline and wait until its HAProxy answers. Its ports come from
    `free_port()`; when its log says another process took one before HAProxy (or the
    status server) bound it, it starts again on fresh ports, at most PORT_ATTEMPTS times."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        offset = pipeline.log_size()
        pipeline.start()
        if await _up(pipeline, offset, within):
            return
        pipeline.stop()
        if attempt == PORT_ATTEMPTS:
            raise RuntimeError(
                f"{pipeline.name}: a port was taken by another process at each of "
                f"{PORT_ATTEMPTS} starts; log {pipeline.log}:\n{pipeline.tail_log()}"
            )
        pipeline.fresh_ports()


async def _up(pipeline: Pipeline, offset: int, within: float) -> bool:
    """True once HAProxy answers, False if the pipeline lost a port; raises otherwise."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = pipeline.log_since(offset)
        if lost_a_port(text):
            return False
        if not pipeline.alive():
            raise RuntimeError(f"{pipeline.name} exited:\n{pipeline.tail_log()}")
        sock = pipeline.stats_socket()
        if sock is not None and sock.exists() and pipeline.own_ports_bound():
            try:
                await haproxy.servers(sock)
                return True
            except OSError:
                pass
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{pipeline.name}: HAProxy not up within {within}s\n{pipeline.tail_log()}")


async def serving(pipeline: Pipeline, service: str) -> Counter[str]:
    sock = pipeline.stats_socket()
    if sock is None:
        return Counter()
    try:
        pooled = adapter.pooled_backends(pipeline.state_dir)
        return haproxy.serving(await haproxy.servers(sock), service, pooled)
    except (OSError, TimeoutError, ValueError, KeyError):
        return Counter()  # between two HAProxy processes: ask again


async def converge(
    pipeline: Pipeline, service: str, want: Counter[str], within: float, every: float = 0.01
) -> float | None:
    """Monotonic time at which HAProxy serves exactly `want` for `service`; None if never."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await serving(pipeline, service) == want:
            return time.monotonic()
        await asyncio.sleep(every)
    return None


async def wait_counts(pipeline: Pipeline, done: object, within: float) -> Counts | None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        counts = pipeline.counts()
        if done(counts):  # type: ignore[operator]
            return counts
        await asyncio.sleep(0.005)
    return None


# -- P1 / P2 ----------------------------------------------------------------------------


async def setup_base(env: Env, pipeline: Pipeline) -> None:
    """Service p1 with 1,000 servers, served by HAProxy before any trial starts."""
    prefix = pipeline.prefix
    await put_many(
        env.store,
        [
            (keys.instance_key(prefix, "p1", f"base-{i:04d}"), instance(port, LIGHT))
            for i, port in enumerate(env.base)
        ],
    )
    want = Counter(f"127.0.0.1:{p}" for p in env.base)
    if await converge(pipeline, "p1", want, within=60, every=0.1) is None:
        got = await serving(pipeline, "p1")
        raise RuntimeError(
            f"{pipeline.name}: p1 never reached 1,000 servers (has {sum(got.values())})\n"
            + pipeline.tail_log()
        )


async def check_time(pipeline: Pipeline, runs: int = 5) -> float:
    """How long `haproxy -c` takes on the pipeline's live config: a floor for any path
    that validates before applying."""
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "haproxy", "-c", "-q", "-f", str(pipeline.config_file),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await proc.wait()
        times.append(time.monotonic() - t0)
    return statistics.median(times)


async def p1_trials(env: Env, pipeline: Pipeline, trials: int, budget: float) -> Latencies:
    """Membership change: one new server into the 1,000-server backend, then removed again."""
    result = Latencies(check_seconds=await check_time(pipeline))
    probe = Probe(pipeline.http_port, "p1.localhost")
    prefix = pipeline.prefix
    base = Counter(f"127.0.0.1:{p}" for p in env.base)
    before = pipeline.counts()
    stop_at = time.monotonic() + budget
    try:
        for k in range(trials):
            if time.monotonic() > stop_at:
                result.budget_hit = True
                break
            port = env.p1[k % len(env.p1)]
            key = keys.instance_key(prefix, "p1", f"new-{k:04d}")
            t0 = time.monotonic()
            await env.store.put(key, instance(port, HEAVY))
            seen = await probe.until(str(port).encode(), within=5.0)
            if seen is None:
                result.misses += 1
            else:
                result.samples.append(seen - t0)
            await env.store.delete(key)
            # The next trial starts from the same 1,000 servers, not from a pending removal.
            await converge(pipeline, "p1", base, within=10.0)
            await asyncio.sleep(0.02)
    finally:
        probe.close()
    result.applied = pipeline.counts() - before
    return result


async def haproxy_floor(env: Env, pipeline: Pipeline, trials: int = 20) -> Latencies:
    """HAProxy's own share of P1: `add server` + `enable server` over the admin socket
    straight to the first request served, with etcd and the reloader left out. Run
    behind the reloader's back on the same live HAProxy, and undone after each trial."""
    from bench import adapter

    result = Latencies()
    sock = pipeline.stats_socket()
    if sock is None:
        return result
    pooled = adapter.pooled_backends(pipeline.state_dir)
    backend = next((b for b, s in pooled.items() if s == "p1"), adapter.backend_name("p1"))
    probe = Probe(pipeline.http_port, "p1.localhost")
    try:
        for k in range(trials):
            port = env.p1[k % len(env.p1)]
            ref = f"{backend}/bench-floor-{k}"
            t0 = time.monotonic()
            await haproxy.command(sock, f"add server {ref} 127.0.0.1:{port} weight {HEAVY}")
            await haproxy.command(sock, f"enable server {ref}")
            seen = await probe.until(str(port).encode(), within=2.0)
            if seen is None:
                result.misses += 1
            else:
                result.samples.append(seen - t0)
            await haproxy.command(sock, f"set server {ref} state maint")
            probe.close()  # idle server-side connections would keep the server from going
            await asyncio.sleep(0.02)
            await haproxy.command(sock, f"del server {ref}")
    finally:
        probe.close()
    return result


async def p2_trials(env: Env, pipeline: Pipeline, trials: int, budget: float) -> Latencies:
    """Structural change: a new service (new backend and route), one instance."""
    result = Latencies()
    prefix = pipeline.prefix
    before = pipeline.counts()
    stop_at = time.monotonic() + budget
    for k in range(trials):
        if time.monotonic() > stop_at:
            result.budget_hit = True
            break
        port = env.p2[k % len(env.p2)]
        service = f"n{k:04d}"
        probe = Probe(pipeline.http_port, f"{service}.localhost")
        reloads = pipeline.counts().reloads
        try:
            t0 = time.monotonic()
            await env.store.put(keys.instance_key(prefix, service, "i0"), instance(port))
            seen = await probe.until(str(port).encode(), within=10.0)
        finally:
            probe.close()
        await asyncio.sleep(0.05)  # let the reload finish (old worker handed over)
        if seen is None:
            result.misses += 1
        else:
            result.samples.append(seen - t0)
            reloaded = pipeline.counts().reloads > reloads
            (result.reloaded if reloaded else result.pooled).append(seen - t0)
    result.applied = pipeline.counts() - before
    return result


# -- P3 ---------------------------------------------------------------------------------


@dataclass
class ReloadSafety:
    reloads: int
    results: list[LoadResult]
    seconds: float

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.results)

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.results)


async def p3_reloads(env: Env, pipeline: Pipeline, reloads: int, budget: float) -> ReloadSafety:
    prefix = pipeline.prefix
    await put_many(
        env.store,
        [(keys.instance_key(prefix, "load", f"l{i}"), instance(p)) for i, p in enumerate(env.load)],
    )
    want = Counter(f"127.0.0.1:{p}" for p in env.load)
    if await converge(pipeline, "load", want, within=30) is None:
        raise RuntimeError(f"{pipeline.name}: service 'load' never served")
    url = f"http://127.0.0.1:{pipeline.http_port}/"
    loads = [
        keepalive(url, "load.localhost", connections=4).start(),
        new_connections(url, "load.localhost", workers=4, rate=250).start(),
    ]
    t0 = time.monotonic()
    done = 0
    try:
        await asyncio.sleep(1.0)
        stop_at = time.monotonic() + budget
        for k in range(reloads):
            if time.monotonic() > stop_at:
                break
            before = pipeline.counts().reloads
            # leastconn: not a plain HTTP backend, so the reloader cannot put the new
            # service in a pool backend and must reload (the baseline reloads anyway).
            service = f"r{k:03d}"
            await env.store.put(keys.spec_key(prefix, service), '{"balance": "leastconn"}')
            key = keys.instance_key(prefix, service, "i0")
            await env.store.put(key, instance(env.p2[k % len(env.p2)]))
            if await wait_counts(pipeline, lambda c, b=before: c.reloads > b, 10.0) is None:
                raise RuntimeError(f"{pipeline.name}: reload {k} never happened")
            done += 1
            await asyncio.sleep(0.1)  # the old process drains while the load goes on
        await asyncio.sleep(1.0)
    finally:
        results = [load.stop() for load in loads]
    return ReloadSafety(done, results, time.monotonic() - t0)


# -- P4 ---------------------------------------------------------------------------------


@dataclass
class Storm:
    applies: int
    reloads: int
    runtime: int
    after_last: float | None  # s from the last put until HAProxy equals etcd
    after_first: float | None
    spread: float  # s between the first and the last put


async def p4_storm(env: Env, pipeline: Pipeline, count: int = 1000) -> Storm:
    prefix = pipeline.prefix
    first_key = keys.instance_key(prefix, "storm", "s-seed")
    await env.store.put(first_key, instance(env.load[0]))
    seed = Counter([f"127.0.0.1:{env.load[0]}"])
    if await converge(pipeline, "storm", seed, within=30) is None:
        raise RuntimeError(f"{pipeline.name}: service 'storm' never served")
    await asyncio.sleep(1.0)  # let any debounce settle before counting
    before = pipeline.counts()
    items = [
        (keys.instance_key(prefix, "storm", f"s-{i:04d}"), instance(port))
        for i, port in enumerate(env.base[:count])
    ]
    ticks = 100  # 10 puts every 10 ms: the registrations spread over one second
    per_tick = len(items) // ticks
    sent: list[asyncio.Task[None]] = []
    t_first = time.monotonic()
    for tick in range(ticks):
        await asyncio.sleep(max(0.0, t_first + tick * 0.01 - time.monotonic()))
        batch = items[tick * per_tick : (tick + 1) * per_tick]
        sent.append(asyncio.create_task(put_many(env.store, batch, per_tick)))
    await asyncio.gather(*sent)
    t_last = time.monotonic()  # the last put acknowledged by etcd
    want = seed + Counter(f"127.0.0.1:{p}" for p in env.base[:count])
    seen = await converge(pipeline, "storm", want, within=60.0, every=0.02)
    await asyncio.sleep(2.0)  # applies still queued would show up in the counters now
    delta = pipeline.counts() - before
    return Storm(
        applies=delta.applies,
        reloads=delta.reloads,
        runtime=delta.runtime,
        after_last=None if seen is None else seen - t_last,
        after_first=None if seen is None else seen - t_first,
        spread=t_last - t_first,
    )


# -- P1-P4 for one pipeline ---------------------------------------------------------------


@dataclass
class Compared:
    p1: Latencies | None = None
    floor: Latencies | None = None
    p2: Latencies | None = None
    p3: ReloadSafety | None = None
    p4: Storm | None = None
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Budgets:
    """Seconds each phase may take per pipeline, so a busy machine still ends in time."""

    p1: float = 120.0
    p2: float = 100.0
    p3: float = 130.0


async def run_pipeline(
    env: Env, kind: str, only: set[str], trials: int, reloads: int, budgets: Budgets
) -> Compared:
    out = Compared()
    pipeline = make_pipeline(kind, env, f"/bench-{kind}")
    clock = time.monotonic()

    def progress(what: str) -> None:
        nonlocal clock
        print(f"[bench] {kind} {what}: {time.monotonic() - clock:.0f}s", flush=True)
        clock = time.monotonic()

    try:
        await start(pipeline)
        if only & {"P1", "P2"}:
            await setup_base(env, pipeline)
            progress("1,000 servers up")
        if "P1" in only:
            out.p1 = await p1_trials(env, pipeline, trials, budgets.p1)
            if kind == "fluster":
                out.floor = await haproxy_floor(env, pipeline)
            progress("P1")
        if "P2" in only:
            out.p2 = await p2_trials(env, pipeline, trials, budgets.p2)
            progress("P2")
        if "P3" in only:
            out.p3 = await p3_reloads(env, pipeline, reloads, budgets.p3)
            progress("P3")
        if "P4" in only:
            out.p4 = await p4_storm(env, pipeline)
            progress("P4")
    except Exception as exc:
        out.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
    finally:
        pipeline.stop()
    return out


# -- P5 ---------------------------------------------------------------------------------


@dataclass
class Scale:
    snapshot: float
    render: float
    validate: float
    rss_kb: int | None = None
    peak_kb: int | None = None
    first_apply: float | None = None
    config_bytes: int = 0
    error: str = ""

    @property
    def total(self) -> float:
        return self.snapshot + self.render + self.validate


async def p5_scale(env: Env, services: int = 500, per_service: int = 20) -> Scale:
    from bench import adapter
    from fluster.catalog import Catalog

    prefix = "/bench-p5"
    items = [
        (
            keys.instance_key(prefix, f"s{s:03d}", f"i{i:02d}"),
            instance(env.base[(s * per_service + i) % len(env.base)]),
        )
        for s in range(services)
        for i in range(per_service)
    ]
    await put_many(env.store, items, 128)
    runs = []
    state = env.work / "p5"
    state.mkdir(exist_ok=True)
    for _ in range(1 if env.quick else 3):
        t0 = time.monotonic()
        snapshot = await Catalog(env.store, prefix).load()
        t1 = time.monotonic()
        text = adapter.render(snapshot, state_dir=state, http_bind="127.0.0.1:1")
        t2 = time.monotonic()
        cfg = StateDir(state).config
        cfg.write_text(text)
        check = await asyncio.create_subprocess_exec(
            "haproxy", "-c", "-q", "-f", str(cfg), stderr=asyncio.subprocess.PIPE
        )
        _, err = await check.communicate()
        t3 = time.monotonic()
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused the 10,000-server config: {err[-500:]!r}")
        runs.append((t1 - t0, t2 - t1, t3 - t2, len(text)))
    runs.sort(key=lambda r: r[0] + r[1] + r[2])
    snap, render, validate, size = runs[len(runs) // 2]
    result = Scale(snap, render, validate, config_bytes=size)
    # The reloader itself on the same 10,000 instances: time to first apply, its RSS.
    pipeline = make_pipeline("fluster", env, prefix)
    try:
        t0 = time.monotonic()
        await start(pipeline, within=60)
        total = Counter()  # type: Counter[str]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sock = pipeline.stats_socket()
            if sock is not None and sock.exists():
                with contextlib.suppress(OSError, TimeoutError):
                    total = Counter(s.backend for s in await haproxy.servers(sock) if s.serving)
            if sum(total.values()) >= len(items):
                result.first_apply = time.monotonic() - t0
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        result.rss_kb = rss_kb(pipeline.pid)
        result.peak_kb = rss_kb(pipeline.pid, "VmHWM")
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        pipeline.stop()
    return result


# -- P6 ---------------------------------------------------------------------------------


@dataclass
class Footprint:
    rss_kb: int
    cpu_percent: float
    window: float
    requests_per_min: float
    by_method: dict[str, float]
    ttl: int
    command: str
    # Other modes, by bench.sidekick_footprint when a Docker engine is there: mode -> RSS
    # MB (companion, host agent, and the static sidekick as its image runs it).
    others: dict[str, float] = field(default_factory=dict)
    others_note: str = ""


def console_script(name: str) -> str:
    """The venv's console script (the venv's bin is not necessarily on PATH)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)


def etcd_messages(env: Env) -> Counter[str]:
    """gRPC messages etcd has received, by method (etcd's own /metrics)."""
    return footprint.etcd_messages(env.etcd)


IMAGE = "fluster/sidekick:dev"


def other_modes(env: Env, window: float, ttl: int) -> tuple[dict[str, float], str]:
    """RSS of a companion, a host agent and the static sidekick in its image (MB), each
    idle over `window` s; empty, with the reason, when there is no Docker engine."""
    from testbed.docker import docker_cmd

    if docker_cmd("info", check=False).returncode != 0:
        return {}, "no Docker engine: companion, host agent and image not measured"
    args = argparse.Namespace(window=window, ttl=ttl, containers=1)
    work = env.work / "p6-modes"
    work.mkdir(exist_ok=True)
    rows = footprint.docker_row(env.etcd, args, work)
    if docker_cmd("image", "inspect", IMAGE, check=False).returncode == 0:
        rows.append(
            footprint.measure(env.etcd, f"static, in {IMAGE}",
                              ["--service", "p6image", "--address", "127.0.0.1:9", "--ttl",
                               str(ttl)], "/fluster/services/p6image/", window, work,
                              image=IMAGE)
        )  # fmt: skip
        note = ""
    else:
        note = f"{IMAGE} not built (scripts/build-images.sh): not measured in its image"
    return {str(r["mode"]): float(str(r["rss_mb"])) for r in rows}, note


async def p6_sidekick(env: Env, window: float, ttl: int = 10) -> Footprint:
    from bench.pipelines import cpu_seconds

    prefix = "/bench-p6"
    state = env.work / "p6"
    state.mkdir(exist_ok=True)
    argv = [
        console_script("sidekick"),
        "--service", "p6",
        "--address", f"127.0.0.1:{env.load[0]}",
        "--instance", "p6-0",
        "--ttl", str(ttl),
        "--check", "none",
        "--etcd-endpoints", env.etcd.endpoints,
        "--prefix", prefix,
        "--state-dir", str(state),
        "--log-level", "warning",
    ]  # fmt: skip
    proc = spawn(argv, state / "sidekick.log")
    try:
        key = keys.instance_key(prefix, "p6", "p6-0")
        deadline = time.monotonic() + 30
        while (await env.store.get(key))[1] is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "sidekick never registered:\n" + (state / "sidekick.log").read_text()[-800:]
                )
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # start-up done: measure the steady state only
        m0, c0, t0 = etcd_messages(env), cpu_seconds(proc.pid), time.monotonic()
        await asyncio.sleep(window)
        m1, c1, t1 = etcd_messages(env), cpu_seconds(proc.pid), time.monotonic()
        rss = rss_kb(proc.pid)
    finally:
        proc.terminate()
        wait_or_kill(proc, 15)
    elapsed = t1 - t0
    delta = {m: (m1[m] - m0[m]) * 60 / elapsed for m in m1 if m1[m] != m0[m]}
    others, note = await asyncio.to_thread(other_modes, env, min(window, 20.0), ttl)
    return Footprint(
        others=others,
        others_note=note,
        rss_kb=rss,
        cpu_percent=100 * (c1 - c0) / elapsed,
        window=elapsed,
        requests_per_min=sum(delta.values()),
        by_method=delta,
        ttl=ttl,
        command=" ".join(["sidekick", *argv[1:11]]) + " ...",
    )
