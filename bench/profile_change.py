"""Where a running reloader's CPU goes per membership change, by py-spy.

    python -m bench.profile_change [--services 500] [--instances 2] [--changes 300]
                                   [--rate 250] [--raw FILE]

Starts a private etcd, seeds N services of M instances (P1: 1 of 1,000), starts `reloader run` (its
console defaults, its own HAProxy), then adds and removes one instance of one service
`--changes` times (each waits until HAProxy's admin socket shows it, then 0.1 s, as P10
does), twice: first unobserved, for the reloader's own CPU per change (/proc, HAProxy
not included), then under `py-spy record --native` (whose pauses inflate the CPU), for
the share of the busy samples by what they were doing. py-spy is not a dependency of fluster:
`pip install py-spy` first.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import haproxy
from bench.pipelines import cpu_seconds
from fluster import keys
from fluster.store import EtcdSettings, open_store
from testbed.etcd import Etcd
from testbed.reloader import ReloaderProcess

# What a sample was doing: the first of these found in its stack (outermost first).
CATEGORIES = (
    ("runtime API: connecting to the admin socket", ("CliSession.open",)),
    ("runtime API: commands and replies", ("RuntimeApi",)),
    ("removal guard (which services changed, capacity)", ("RemovalGuard",)),
    ("host facts (ports, names)", ("FactFinder",)),
    ("model build (changed services only)", ("build_model", "ServiceCache")),
    ("files written after runtime changes", ("write_live",)),
    ("status: change record and log line", ("describe_change", "Stats.", "report")),
    ("status key write (reloader/publish.py)", ("Lease", "Publisher")),
    ("catalog: watch events into a snapshot", ("Catalog", "Follow", "GrpcStore.watch")),
    ("rest of the apply", ("Reloader.apply", "Applier.apply")),
    ("debounce and pipeline loop", ("Reloader.pipeline", "Debouncer")),
    ("gRPC's own threads (C core)", ("cygrpc", "Thread.run")),
)
IDLE = ("epoll_wait", "epoll_pwait")


def categorise(raw: Path) -> tuple[Counter[str], int]:
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n_text = line.rpartition(" ")
        frames, n = stack.split(";"), int(n_text)
        if any(idle in frames[-1] for idle in IDLE):
            continue
        total += n
        for name, marks in CATEGORIES:
            if any(mark in frame for frame in frames for mark in marks):
                counts[name] += n
                break
        else:
            counts["event loop (uvloop) and other native work"] += n
    return counts, total


async def churn(store_endpoint: tuple[str, ...], sock: Path, changes: int) -> list[float]:
    latencies = []
    async with open_store(EtcdSettings(endpoints=store_endpoint)) as store:
        key = keys.instance_key("/fluster", "s000", "extra")
        for k in range(changes):
            adding = k % 2 == 0
            started = time.monotonic()
            if adding:
                await store.put(key, "127.0.0.1:20002")
            else:
                await store.delete(key)
            while True:  # polling HAProxy's admin socket, as P10 does
                state = await haproxy.command(sock, "show servers state be_s000")
                if (" extra " in state) == adding:
                    break
                await asyncio.sleep(0.001)
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.1)
    return latencies


async def seed(endpoints: tuple[str, ...], services: int, instances: int) -> None:
    async with open_store(EtcdSettings(endpoints=endpoints)) as store:
        for i in range(services):
            for j in range(instances):
                await store.put(
                    keys.instance_key("/fluster", f"s{i:03d}", f"i{j}"),
                    f"127.0.0.1:{20000 + j % 2}",
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--services", type=int, default=500)
    parser.add_argument("--instances", type=int, default=2, help="per service")
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks here")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="profile-change-") as tmp:
        work = Path(tmp)
        etcd = Etcd(work / "etcd").start()
        edge = ReloaderProcess(etcd, work / "edge", "--log-level", "warning")
        try:
            asyncio.run(seed(etcd.endpoint_list, args.services, args.instances))
            edge.start()
            time.sleep(15)  # past the start's own work (checks, pool refill)
            assert edge.proc is not None
            pid = edge.proc.pid
            sock = edge.state_dir / "admin.sock"
            cpu0 = cpu_seconds(pid)
            latencies = asyncio.run(churn(etcd.endpoint_list, sock, args.changes))
            time.sleep(1)  # the deferred work of the last change
            per_change = (cpu_seconds(pid) - cpu0) / args.changes
            raw = work / "profile.txt"
            seconds = int(args.changes * 0.11) + 10
            spy_proc = subprocess.Popen(
                [spy, "record", "-p", str(pid), "-r", str(args.rate), "-f", "raw", "--native",
                 "-o", str(raw), "-d", str(seconds)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)
            asyncio.run(churn(etcd.endpoint_list, sock, args.changes))
            spy_proc.wait(seconds + 30)
            counts, total = categorise(raw)
            if args.raw:
                shutil.copyfile(raw, args.raw)
        finally:
            edge.stop()
            etcd.stop()
    latencies.sort()
    print(
        f"{args.changes} changes with {args.services} services of {args.instances} "
        "instances: reloader CPU "
        f"{per_change * 1000:.2f} ms per change; put -> in HAProxy p50 "
        f"{latencies[len(latencies) // 2] * 1000:.1f} ms; {total} busy samples"
    )
    print("| share of busy samples | ms per change | what |")
    print("|---|---|---|")
    for name, n in counts.most_common():
        share = n / total if total else 0.0
        print(f"| {100 * share:.0f} % | {share * per_change * 1000:.2f} | {name} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
