"""`python -m bench`: run the rows, print the table, write docs/BENCHMARKS.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import adapter, cdf, churn, deploy, fleet, report, routing, scenarios, tls
from bench.backends import Backends, raise_fd_limit
from bench.report import Row, ms, ratio
from fluster.store import EtcdSettings, open_store
from testbed.etcd import Etcd

ROWS = (
    "P1",
    "P2",
    "P3",
    "P4",
    "P5",
    "P6",
    "P7",
    "P10",
    "H1",
    "D1",
    "R-CHURN",
    "R-NODE",
    "R-MASS",
    "R-CHAOS",
    "F1",
    "F2",
    "F3",
    "F4",
)
DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer trials (a smoke run)")
    parser.add_argument("--only", default=",".join(ROWS), help="rows to run, e.g. P1,P3")
    parser.add_argument("--trials", type=int, help="P1/P2 trials (default 200, quick 30)")
    parser.add_argument("--reloads", type=int, help="P3 reloads (default 100, quick 20)")
    parser.add_argument("--idle", type=float, help="P6 window in s (default 60, quick 15)")
    parser.add_argument("--minutes", type=float, help="R-CHAOS length (default 10, quick 1)")
    parser.add_argument("--churn", type=float, help="R-CHURN seconds (default 30, quick 10)")
    parser.add_argument("--out", type=Path, default=DOC, help="markdown file to write")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    args.only = [r.strip().upper() for r in args.only.split(",") if r.strip()]
    unknown = set(args.only) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    args.trials = args.trials or (30 if args.quick else 200)
    args.reloads = args.reloads or (20 if args.quick else 100)
    args.idle = args.idle or (15.0 if args.quick else 60.0)
    args.minutes = args.minutes or (1.0 if args.quick else 10.0)
    args.churn = args.churn or (10.0 if args.quick else 30.0)
    return args


def row_command(args: argparse.Namespace, key: str) -> str:
    """The command that reproduces one row with the same settings as this run."""
    parts = [".venv/bin/python", "-m", "bench"]
    if args.quick:
        parts.append("--quick")
    parts += ["--only", key]
    defaults = parse_args(["--quick"] if args.quick else [])
    for flag, value in (
        ("--trials", args.trials),
        ("--reloads", args.reloads),
        ("--idle", args.idle),
        ("--minutes", args.minutes),
        ("--churn", args.churn),
    ):
        if value != getattr(defaults, flag[2:]):
            parts += [flag, str(value)]
    return shlex.join(parts)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


@contextlib.contextmanager
def _noted(key: str, notes: list[str]) -> Iterator[None]:
    """Run one scenario: an error becomes a note (the other rows still come), and the
    time it took is printed as progress."""
    started = time.monotonic()
    try:
        yield
    except Exception as exc:
        notes.append(f"{key}: {type(exc).__name__}: {exc}")
    print(f"[bench] {key} took {time.monotonic() - started:.0f}s", flush=True)


async def run(args: argparse.Namespace, work: Path) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = [
        "fluster = `reloader run` with its defaults (debounce quiet 0.05 s, max wait 0.5 s, "
        "runtime API for server, route and pooled new-service changes with the files written "
        "once the catalog is quiet for 0.5 s and checked on a timer (at most once a minute), "
        "`haproxy -c` then a master-worker reload otherwise) and "
        f"`--http-pool {adapter.POOL}`, started as its console script on its own prefix, state "
        "dir and port.",
        "baseline = bench/baseline.py: on every change, render with the reloader's own "
        "templates (but routing by one ACL per service, bench/baseline_templates/), skip if "
        "unchanged, `haproxy -c`, then `haproxy -D -sf <old pid>`; no runtime API, no debounce, "
        "no master-worker (what confd + HAProxy do).",
        "Each pipeline runs P1 -> P2 -> P3 -> P4 in that order on one prefix, so P2-P4 see the "
        "1,000-server backend of P1 and the services P2 and P3 added.",
    ]
    only = set(args.only)
    etcd = Etcd(work / "etcd").start()
    backends = Backends(21000, scenarios.PORTS_NEEDED).start()
    store = open_store(EtcdSettings(endpoints=etcd.endpoint_list))
    await store.connect()
    env = scenarios.Env(work, etcd, store, backends, args.quick)
    env.split_ports()
    try:
        compared: dict[str, scenarios.Compared] = {}
        if only & {"P1", "P2", "P3", "P4"}:
            for kind in ("fluster", "baseline"):
                started = time.monotonic()
                compared[kind] = await scenarios.run_pipeline(
                    env, kind, only, args.trials, args.reloads, scenarios.Budgets()
                )
                print(f"[bench] {kind} P1-P4 took {time.monotonic() - started:.0f}s", flush=True)
                notes.extend(compared[kind].errors)
            rows += comparison_rows(args, compared)
        if "P5" in only:
            with _noted("P5", notes):
                rows.append(p5_row(args, await scenarios.p5_scale(env)))
        if "P7" in only:
            with _noted("P7", notes):
                lookups = {k: await routing.p7_lookup(env, k) for k in ("fluster", "baseline")}
                rows.append(p7_row(args, lookups))
        if "P10" in only:
            with _noted("P10", notes):
                costs = {
                    (k, n): await routing.p10_change_cost(env, k, n)
                    for k in ("fluster", "baseline")
                    for n in (1, 500)
                }
                profile = await asyncio.to_thread(profile_change)
                rows.append(p10_row(args, costs, profile))
        if "H1" in only:
            with _noted("H1", notes):
                figures = await tls.h1_https(env, args.trials)
                rows.append(tls.row(row_command(args, "H1"), figures, args.trials))
        if "D1" in only:
            with _noted("D1", notes):
                figures = await asyncio.to_thread(
                    deploy.d1_deploy, work, etcd, 2 if args.quick else 3
                )
                rows.append(deploy.row(row_command(args, "D1"), figures))
        if "P6" in only:
            with _noted("P6", notes):
                rows.append(p6_row(args, await scenarios.p6_sidekick(env, args.idle)))
        if "F1" in only:
            with _noted("F1", notes):
                rows.append(f1_row(args, await fleet.f1_bookkeeping(etcd, store, work)))
        if "F2" in only:
            with _noted("F2", notes):
                rows.append(f2_row(args, await fleet.f2_rotation(etcd, store, work)))
        if "F3" in only:
            with _noted("F3", notes):
                rows.append(f3_row(args, await fleet.f3_fleet(etcd, work, backends.ports)))
        if "F4" in only:
            with _noted("F4", notes):
                port = backends.ports[-1] + 1
                rows.append(f4_row(args, await fleet.f4_proxy(etcd, store, work, port)))
        for key, make in (
            ("R-CHURN", lambda c: churn.churn_row(c, work, args.churn)),
            ("R-NODE", lambda c: churn.node_row(c, work)),
            ("R-MASS", lambda c: churn.mass_row(c, work)),
            ("R-CHAOS", lambda c: churn.chaos_row(c, work, args.minutes)),
        ):
            if key in only:
                with _noted(key, notes):
                    rows.append(await asyncio.to_thread(make, row_command(args, key)))
    finally:
        await store.close()
        backends.stop()
        etcd.stop()
    return rows, notes


def comparison_rows(args: argparse.Namespace, c: dict[str, scenarios.Compared]) -> list[Row]:
    ours, base = c.get("fluster", scenarios.Compared()), c.get("baseline", scenarios.Compared())
    rows = []
    if "P1" in args.only:
        row = latency_row(args, "P1", ours.p1, base.p1, p50_goal=0.005, p99_goal=0.010)
        picture(args, row, "P1", {"fluster": ours.p1, "baseline": base.p1})
        if ours.floor and ours.floor.samples:
            f = ours.floor
            row.notes.append(
                f"HAProxy's own floor, for scale: `add server` + `enable server` on the admin "
                f"socket to the first request served, no etcd, no reloader: p50 {ms(f.p50)}, "
                f"max {ms(f.worst)} over {len(f.samples)} trials"
                + (f" ({f.misses} never served)" if f.misses else "")
                + "."
            )
        rows.append(row)
    if "P2" in args.only:
        row = latency_row(args, "P2", ours.p2, base.p2, p50_goal=0.015, p99_goal=0.040)
        pool = scenarios.Latencies(samples=ours.p2.pooled) if ours.p2 else None
        fallback = scenarios.Latencies(samples=ours.p2.reloaded) if ours.p2 else None
        series = {"fluster, pool": pool, "fluster, reload fallback": fallback}
        picture(args, row, "P2", {**series, "baseline": base.p2})
        rows.append(row)
    if "P3" in args.only:
        rows.append(p3_row(args, ours.p3, base.p3))
    if "P4" in args.only:
        rows.append(p4_row(args, ours.p4, base.p4))
    return rows


def picture(
    args: argparse.Namespace, row: Row, key: str, series: dict[str, scenarios.Latencies | None]
) -> None:
    """Write the row's latency CDF beside the document and link it from the row."""
    samples = {name: lat.samples for name, lat in series.items() if lat and lat.samples}
    if args.no_write or not samples:
        return
    name = f"bench-{key.lower()}-cdf.svg"
    (args.out.parent / name).parent.mkdir(parents=True, exist_ok=True)
    (args.out.parent / name).write_text(cdf.svg(f"{key}: {row.what}", samples))
    row.notes.append(f"Distribution (written by this run): ![{key} CDF]({name})")


def lat_text(lat: scenarios.Latencies | None) -> str:
    if lat is None or not lat.samples:
        return "not measured" if lat is None else f"no sample ({lat.misses} misses)"
    text = f"p50 {ms(lat.p50)} / p99 {ms(lat.p99)}"
    if lat.budget_hit:
        text += f" ({len(lat.samples) + lat.misses} trials: time budget)"
    return text + (f", {lat.misses} missed" if lat.misses else "")


def latency_row(
    args: argparse.Namespace,
    key: str,
    ours: scenarios.Latencies | None,
    base: scenarios.Latencies | None,
    *,
    p50_goal: float | None,
    p99_goal: float,
) -> Row:
    n = args.trials
    if key == "P1":
        what = (
            f"etcd put -> first request served, new server in a 1,000-server backend ({n} trials)"
        )
        goal = "p50 <= 5 ms, p99 <= 10 ms"
    else:
        what = f"etcd put -> first request served, new HTTP service ({n} trials)"
        goal = "from the pool: p50 <= 15 ms, p99 <= 40 ms, 0 reloads"
    full = ours
    if key == "P2" and ours is not None:
        # The verdict is on the trials the backend pool served; the reload fallback (the
        # pool used up) is reported beside them.
        ours = scenarios.Latencies(samples=ours.pooled, misses=ours.misses)
    ok = None
    if ours is not None and ours.samples:
        ok = ours.p99 <= p99_goal and not ours.misses  # type: ignore[operator]
        if p50_goal is not None:
            ok = ok and ours.p50 <= p50_goal  # type: ignore[operator]
    ratio_text = "-"
    if ours and base and ours.samples and base.samples:
        ratio_text = f"p50 {ratio(ours.p50, base.p50)} / p99 {ratio(ours.p99, base.p99)}"
    notes = [
        "Latency = from just before the etcd put until the first probe response whose body is "
        "the new backend's port. The probe is one keep-alive HTTP/1.1 connection sending "
        "requests back to back through HAProxy (reconnecting when a reload closes it).",
    ]
    if key == "P1":
        notes.append(
            "The 1,000 existing servers have weight 1 and the new one weight 256, so roundrobin "
            "sends it ~20% of requests: the probe sees it within a few requests (~1 ms) of "
            "HAProxy using it. After each trial the server is deleted and the next trial waits "
            "until HAProxy's stats socket shows the 1,000 servers again."
        )
    else:
        notes.append(
            "Each trial registers one instance of a new service n0000, n0001, ... (a new backend "
            "and a new Host route), probed with `Host: nNNNN.localhost`; the services "
            "accumulate, on top of the 1,000-server backend of P1. The reloader runs with "
            f"`--http-pool {adapter.POOL}`: the first {adapter.POOL} new services take a "
            "prepared backend through the runtime API (`add server` + `add map`), the rest "
            "find the pool used up (no quiet period lets it refill) and take a reload; a "
            "trial counts as a reload when the pipeline's reload counter moved during it. "
            "The baseline reloads for every one."
        )
    for name, lat in (("fluster", ours), ("baseline", base)):
        if lat and lat.samples:
            notes.append(
                f"{name}: {len(lat.samples)} samples, min {ms(min(lat.samples))}, "
                f"p50 {ms(lat.p50)}, p90 {ms(scenarios.percentile(lat.samples, 90))}, "
                f"p99 {ms(lat.p99)}, max {ms(lat.worst)}, missed (none within the limit) "
                f"{lat.misses}"
            )
        if lat and lat.check_seconds is not None:
            notes.append(
                f"{name}: `haproxy -c` of its live config (1,000 servers) takes "
                f"{ms(lat.check_seconds)} here (median of 5, timed by the bench)"
            )
        a = lat.applied if lat else None
        if a is not None and a.mean_apply is not None:
            notes.append(
                f"{name}: its own counters over the trials (in P1 one apply adds, one removes): "
                f"{a.applies} applies "
                f"({a.runtime} runtime API, {a.reloads} reloads), mean apply time "
                f"{ms(a.mean_apply)} (from the settled change to HAProxy having it; "
                "the rest of the latency is etcd watch delivery, debounce and the probe)"
            )
    if key == "P1":
        notes.append(
            "What is on the path: a lone change is applied on the leading edge of the "
            "debounce; the reloader looks at the changed service only (the model, the "
            "placement and the plan are made from the last ones, a server kept is the same "
            "object and is stepped over), sends the runtime commands over a kept admin "
            "connection in one write (two round trips: additions, then removals), "
            "and writes and checks the files later, off the path. What is left is etcd watch "
            "delivery, the work for the changed backend's 1,000 instances, the admin socket "
            "round trips and the probe (see P10 for the CPU per change). HAProxy itself needs "
            "only the floor shown below."
        )
    if ok is False and key == "P2":
        notes.append(
            "What limits it: a structural change is debounce (50 ms) + render + `haproxy -c` + "
            "server-state dump + master-worker reload, then polling `show proc` until the new "
            "worker is up; the new worker parses the whole config (1,000+ servers) before it "
            "accepts. Both pipelines pay the parse; contention from other processes on the two "
            "cores stretches all of it (see the load average below)."
        )
    ours_text = lat_text(ours)
    if key == "P2" and full is not None:
        ours_text = f"pool ({len(full.pooled)}): {lat_text(ours)}"
        fallback = scenarios.Latencies(samples=full.reloaded)
        ours_text += f"; reload fallback ({len(full.reloaded)}): {lat_text(fallback)}"
        ours = full
    return Row(
        key,
        what,
        goal,
        ours_text,
        lat_text(base),
        ratio_text,
        verdict(ok),
        row_command(args, key),
        notes,
    )


def p3_text(r: scenarios.ReloadSafety | None) -> str:
    if r is None:
        return "not measured"
    return f"{r.failures} failed of {r.requests:,} ({r.reloads} reloads)"


def p3_row(
    args: argparse.Namespace,
    ours: scenarios.ReloadSafety | None,
    base: scenarios.ReloadSafety | None,
) -> Row:
    notes = [
        f"{args.reloads} reloads, each a new service put into etcd; the next one is sent when "
        "the pipeline reports the previous reload done, plus 100 ms, while two clients run "
        "against one service of 4 backends for the whole loop:",
    ]
    for name, r in (("fluster", ours), ("baseline", base)):
        if r is None:
            continue
        for res in r.results:
            notes.append(
                f"{name}, {res.tool}: {res.failures} failed of {res.requests:,} "
                f"({res.detail or 'no errors'}); `{res.command}`"
            )
        notes.append(
            f"{name}: {r.reloads} reloads in {r.seconds:.1f} s"
            + (" (stopped by the time budget)" if r.reloads < args.reloads else "")
        )
    ok = None if ours is None else ours.failures == 0
    partial = ours is not None and ours.reloads < args.reloads
    rt = "-"
    if ours and base:
        rt = ratio(ours.failures, base.failures) if base.failures else f"{ours.failures} vs 0"
    return Row(
        "P3",
        "failed requests during reloads under load (keep-alive wrk + new-connection hey)",
        "0",
        p3_text(ours),
        p3_text(base),
        rt,
        verdict(ok) + (f" (over {ours.reloads} reloads only)" if ours and partial else ""),
        row_command(args, "P3"),
        notes,
    )


def p4_text(s: scenarios.Storm | None) -> str:
    if s is None:
        return "not measured"
    done = "never exact" if s.after_last is None else f"exact {s.after_last:.2f} s after last put"
    return f"{s.applies} applies ({s.reloads} reloads), {done}"


def p4_row(
    args: argparse.Namespace, ours: scenarios.Storm | None, base: scenarios.Storm | None
) -> Row:
    ok = None
    if ours is not None:
        ok = ours.applies <= 3 and ours.after_last is not None and ours.after_last <= 1.5
    rt = "-"
    if ours and base and ours.after_last is not None and base.after_last is not None:
        rt = (
            f"time {ratio(ours.after_last, base.after_last)}, "
            f"applies {ratio(ours.applies, base.applies)}"
        )
    notes = [
        "1,000 new instances of one existing service (1 instance before), written 10 every "
        "10 ms so the registrations span one second; 'exact' = HAProxy's stats socket shows "
        "exactly the 1,001 addresses of etcd as serving (up, not in maintenance, weight > 0), "
        "polled every 20 ms. Applies/reloads = the pipeline's own counters over the storm "
        "plus 2 s.",
    ]
    for name, s in (("fluster", ours), ("baseline", base)):
        if s is not None:
            first = "-" if s.after_first is None else f"{s.after_first:.2f} s"
            notes.append(
                f"{name}: puts spread over {s.spread:.2f} s; exact {first} after the first put; "
                f"{s.applies} applies = {s.reloads} reloads + {s.runtime} runtime-API applies"
            )
    if ok is False and ours is not None:
        notes.append(
            "What limits it: each new server is 2-3 admin-socket commands (add server, enable "
            "health when checked, enable server), each on its own connection, sent one after "
            "another; 1,000 servers are ~3,000 round trips. Batching commands on one connection "
            "(HAProxy accepts `;`-separated commands) would shorten the apply."
            if ours.reloads == 0
            else "What limits it: the storm was applied by reloads, each parsing the whole config."
        )
    return Row(
        "P4",
        "1,000 registrations within one second",
        "<= 3 applies, exact within 1.5 s",
        p4_text(ours),
        p4_text(base),
        rt,
        verdict(ok),
        row_command(args, "P4"),
        notes,
    )


def p5_row(args: argparse.Namespace, s: scenarios.Scale) -> Row:
    rss = "-" if s.rss_kb is None else f"{s.rss_kb / 1024:.0f} MB"
    ours = (
        f"{s.total:.2f} s (snapshot {s.snapshot:.2f} + render {s.render:.2f} + "
        f"validate {s.validate:.2f}); reloader RSS {rss}"
    )
    ok = s.total <= 2.0 and s.rss_kb is not None and s.rss_kb <= 150 * 1024
    notes = [
        "10,000 instances across 500 services (20 each). Snapshot = Catalog.load() (one range "
        "read of the prefix, validation, freezing); render = the reloader's render function; "
        f"validate = `haproxy -c -q -f` of the {s.config_bytes / 1024:.0f} kB result. "
        f"Median of {1 if args.quick else 3} runs, timed in the bench process.",
        "Reloader RSS = VmRSS of `reloader run` started on that prefix, 2 s after HAProxy "
        "served all 10,000 servers"
        + ("" if s.peak_kb is None else f"; its peak (VmHWM) was {s.peak_kb / 1024:.0f} MB")
        + (
            ""
            if s.first_apply is None
            else f". From its start to HAProxy serving all 10,000: {s.first_apply:.2f} s"
        )
        + ".",
    ]
    if s.error:
        notes.append(f"reloader run: {s.error}")
    return Row(
        "P5",
        "10,000 instances / 500 services: snapshot + render + validate; reloader RSS",
        "<= 2 s, <= 150 MB",
        ours,
        "-",
        "-",
        verdict(ok),
        row_command(args, "P5"),
        notes,
    )


def p6_row(args: argparse.Namespace, f: scenarios.Footprint) -> Row:
    expected = 60 / (f.ttl / 3)
    others = "".join(f"; {mode} {mb:.1f} MB" for mode, mb in f.others.items())
    ours = (
        f"RSS static {f.rss_kb / 1024:.1f} MB{others}; CPU {f.cpu_percent:.2f} %, "
        f"{f.requests_per_min:.1f} etcd requests/min (TTL {f.ttl} s)"
    )
    # A window holds window/(TTL/3) keepalives, give or take the one at its edge.
    allowed = f.window / (f.ttl / 3) + 1
    biggest = max([f.rss_kb / 1024, *f.others.values()])
    ok = biggest <= 25 and f.cpu_percent < 1.0 and f.requests_per_min * f.window / 60 <= allowed
    methods = ", ".join(f"{m} {v:.1f}/min" for m, v in sorted(f.by_method.items())) or "none"
    notes = [
        f"One static-mode sidekick (`{f.command}`), measured over {f.window:.0f} s after it "
        "registered: RSS = VmRSS; CPU = (utime + stime) / wall time from /proc; etcd requests "
        "= gRPC messages etcd received during the window (etcd's own /metrics, nothing else "
        f"talks to etcd then; the sidekick's JSON requests reach etcd's gateway, which makes "
        f"them gRPC calls): {methods}. One keepalive per TTL/3 is {expected:.0f}/min.",
        "The other modes by `python -m bench.sidekick_footprint --docker --image "
        f"{scenarios.IMAGE}` (each idle over up to 20 s): a host agent following one "
        "labelled container, a companion beside one container, and the static sidekick as "
        "its image runs it (Debian's Python 3.11, which links more of the standard library "
        "in; this venv's Python alone starts at ~11 MB, Debian's at ~9 MB)."
        + (f" {f.others_note}." if f.others_note else ""),
        "Where the memory is: Python with asyncio and ssl ~20.5 MB (ssl alone maps "
        "libcrypto: ~5 MB), structlog ~2 MB, fluster's own modules and the running loop the "
        "rest. Gone since the 46 MB of 2026-11-27: grpcio and protobuf (etcd through its JSON "
        "gateway, fluster/store_http.py), aiohttp (Docker and etcd over fluster/http1.py), "
        "uvloop (the sidekick runs asyncio's own loop), argparse's import of shutil (bz2, "
        "lzma), and start-up garbage left in the C heap (returned once, 5 s after start).",
    ]
    return Row(
        "P6",
        "one sidekick, idle: RSS (static, companion, host agent, in its image), CPU, etcd "
        "requests per minute",
        "<= 25 MB each, < 1 % CPU, 1 keepalive per TTL/3",
        ours,
        "46 MB (static, 2026-11-27, gRPC)",
        f"{biggest / 46:.2f}",
        verdict(ok),
        row_command(args, "P6"),
        notes,
    )


def p7_row(args: argparse.Namespace, lookups: dict[str, routing.Lookup]) -> Row:
    def text(r: routing.Lookup | None) -> str:
        if r is None or r.ratio is None:
            return "not measured"
        return (
            f"1st {statistics.median(r.first):,.0f} req/s, {r.services}th "
            f"{statistics.median(r.last):,.0f} req/s: ratio {r.ratio:.2f}"
        )

    ours, base = lookups.get("fluster"), lookups.get("baseline")
    ok = None if ours is None or ours.ratio is None else ours.ratio >= 0.95
    notes = [
        "Both pipelines route 500 services s000..s499 (one instance each) to one HAProxy that "
        "answers every request itself (`http-request return`), so the backend is never the "
        "bottleneck; wrk runs alternately against Host s000 and s499 through the pipeline's "
        "HAProxy, 3 rounds of 3 s each; the figures are medians per host. wrk, both HAProxy "
        "processes and everything else share the 2 cores.",
        "fluster routes with one `map_beg` lookup on Host + path in a routes map; the baseline "
        "with one ACL per service evaluated in order (bench/baseline_templates/routing.j2, "
        "what the reloader did before and what a confd template usually does).",
        "How the match method was chosen (measured once by hand, 2026-11-30, load average "
        "3.2-3.6: 500 entries, HAProxy 2.6 answering with `http-request return` so only "
        "routing is timed, `wrk -t1 -c16 -d3s`, two rounds each): ACL chain 1st 73-77k req/s, "
        "500th 6.3-9.2k; `map_beg` on host + path + '/' 1st 78-79k, 500th 54-78k; `map_str` "
        "on the host alone 1st 50-72k, 500th 57-76k. Both maps are flat within the noise; "
        "`map_beg` (a prefix tree, longest match) also does the path prefix in the same "
        "lookup, where `map_str` would need a second one, so the reloader uses `map_beg`.",
    ]
    for name, r in (("fluster", ours), ("baseline", base)):
        if r is not None:
            notes.append(
                f"{name}: rounds 1st {', '.join(f'{x:,.0f}' for x in r.first)}; "
                f"{r.services}th {', '.join(f'{x:,.0f}' for x in r.last)}; `{r.command}`"
            )
    return Row(
        "P7",
        "req/s to the 1st vs the 500th of 500 HTTP services, alternating, same run",
        "ratio >= 0.95",
        text(ours),
        text(base),
        "-"
        if not (ours and base and ours.ratio and base.ratio)
        else f"{ours.ratio / base.ratio:.1f}x",
        verdict(ok),
        row_command(args, "P7"),
        notes,
    )


def profile_change() -> list[str]:
    """`python -m bench.profile_change`'s table as note lines (py-spy, when installed)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return ["Not profiled: py-spy is not installed (`pip install py-spy`)."]
    done = subprocess.run(
        [sys.executable, "-m", "bench.profile_change"], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        return [f"Profiling failed: {done.stderr.strip()[-300:]}"]
    lines = done.stdout.strip().splitlines()
    table = [line for line in lines[1:] if line.startswith("| ") and "---" not in line]
    parts = [line.strip("| ").split(" | ") for line in table[1:]]
    shares = "; ".join(f"{what} {ms_} ms ({share})" for share, ms_, what in parts)
    return [
        "Where the reloader's CPU per change goes (`.venv/bin/python -m bench.profile_change`, "
        f"py-spy --native, 500 services): {lines[0]}. By what the busy samples were doing: "
        f"{shares}."
    ]


def p10_row(
    args: argparse.Namespace,
    costs: dict[tuple[str, int], routing.ChangeCost],
    profile: list[str] | None = None,
) -> Row:
    def text(kind: str) -> str:
        parts = []
        for n in (1, 500):
            c = costs.get((kind, n))
            if c is None or c.per_change is None:
                return "not measured"
            parts.append(f"{ms(c.per_change)} ({n} svc)")
        return " / ".join(parts)

    ours = [costs.get(("fluster", n)) for n in (1, 500)]
    ok = None
    if all(c is not None and c.per_change is not None for c in ours):
        ok = all(c.per_change <= 0.0015 and not c.misses for c in ours if c and c.per_change)
    notes = [
        "Each pipeline starts on a catalog of N services with 2 instances each, settles, "
        "then one instance of one service is added and removed 40 times (each change waits "
        "until HAProxy's admin socket shows it, then 0.1 s), and 3 s of quiet follow so "
        "that deferred work is counted (the reloader writes the files for its runtime "
        "changes once the catalog is quiet for 0.5 s). CPU = user + system time of the "
        "pipeline process and of the children it waited for (`haproxy -c`) from "
        "/proc/PID/stat, over the changes and the quiet period, divided by the changes; "
        "HAProxy's own CPU is not included.",
    ]
    for n in (1, 500):
        c = costs.get(("fluster", n))
        if c is not None and c.check_cpu:
            notes.append(
                f"Not in the fluster figure: the reloader's `haproxy -c` of the file it wrote, "
                f"which runs on a timer, at most once a minute while changes come: "
                f"{c.check_cpu * 1000:.0f} ms CPU with {n} service(s) (timed by the bench on "
                f"the pipeline's file), so {c.check_cpu * 1000 / 60:.2f} ms per change at one "
                "change a second, less the more changes share the minute."
            )
    notes += profile or []
    for (kind, n), c in sorted(costs.items()):
        notes.append(
            f"{kind}, {n} services: {c.changes} changes, {c.cpu_seconds:.3f} s CPU "
            f"({c.cpu_during:.3f} s of it while the changes ran, the rest in the quiet "
            "period after them) in "
            f"{c.wall_seconds:.1f} s, {c.applies} applies ({c.reloads} reloads), "
            f"{c.misses} never seen"
        )
    return Row(
        "P10",
        "CPU (pipeline + children) per membership change, with 1 and with 500 services",
        "<= 1.5 ms, flat in the number of services",
        text("fluster"),
        text("baseline"),
        "-",
        verdict(ok),
        row_command(args, "P10"),
        notes,
    )


def f1_row(args: argparse.Namespace, b: fleet.Bookkeeping) -> Row:
    writes, applies = b.status_writes / b.seconds, b.applies / b.seconds
    per_edge = writes / b.edges
    return Row(
        "F1",
        f"etcd writes of {b.edges} edges' status keys under a churn of 20 changes/s",
        "a few writes a second per edge; `promote` still waits until every edge applied",
        f"{writes:.0f} writes/s ({per_edge:.1f} per edge) for {applies:.0f} applies/s",
        f"{applies:.0f} writes/s (one per apply, before)",
        ratio(writes, applies),
        verdict(per_edge <= 5),
        row_command(args, "F1"),
        [
            f"{b.edges} reloaders (each with its HAProxy) on one etcd; one instance of one "
            f"service put and deleted in turn, {b.changes} changes in {b.seconds:.0f} s. "
            "Writes = put events on `{prefix}/reloaders/` seen by a watch; applies = the "
            "edges' `reloader_applies_total` (noop excluded), each of which wrote the key "
            "before reloader/publish.py coalesced them (at once after a quiet spell, then "
            "at most one per 0.25 s with the newest revision).",
            "What `fluster promote` waits for is still exact: an edge's key never says a "
            "revision it has not applied; under churn it says it at most 0.25 s late "
            "(tests/test_publish.py).",
        ],
    )


def f2_row(args: argparse.Namespace, r: fleet.Rotation) -> Row:
    one, five = fleet.p50(r.one_edge_ms), fleet.p50(r.five_edges_ms)
    return Row(
        "F2",
        "etcd put -> new instance in rotation at every edge, 1 edge vs 5 edges (same run)",
        "5 edges p50 <= 2 x 1 edge p50",
        f"1 edge p50 {one:.1f} ms / max {max(r.one_edge_ms):.1f} ms; 5 edges p50 "
        f"{five:.1f} ms / max {max(r.five_edges_ms):.1f} ms: {five / one:.1f} x",
        "-",
        "-",
        verdict(five <= 2 * one),
        row_command(args, "F2"),
        [
            f"{len(r.one_edge_ms)} trials each: a new instance of a served service put, then "
            "each edge's admin socket (`show servers state`) polled every 0.5 ms until every "
            "edge has the server. First with one edge running, then with five (all on this "
            "machine's 2 cores, with etcd and the poller). What limits it: the edges share "
            "the cores, so each edge's CPU per change (P10, bench/profile_change.py) is "
            "paid five times over before the last one is done.",
        ],
    )


def f3_row(args: argparse.Namespace, r: fleet.FleetRun) -> Row:
    rss = max(r.edge_rss_mb) if r.edge_rss_mb else 0.0
    return Row(
        "F3",
        f"a fleet on one machine: {r.agents} simulated host agents, {r.instances:,} instances "
        f"in {r.services:,} services, {r.edges} edges",
        "figures: cold start, every lease gone -> registered again, etcd request rate, "
        "reloader RSS",
        f"every edge serving all {r.instances:,} {r.cold_seconds:.0f} s after the edges "
        f"started; all leases revoked -> all registered again {r.recovery_seconds:.1f} s after "
        f"the first revoke (the revokes took {r.revoke_seconds:.1f} s), "
        f"etcd peak {r.peak_requests_per_s:,.0f} requests/s (steady "
        f"{r.steady_requests_per_s:,.0f}/s), an edge kept >= {r.min_served_during:,} servers "
        f"meanwhile; reloader RSS {rss:.0f} MB",
        "-",
        "-",
        "n/a",
        row_command(args, "F3"),
        [
            "Agents: one process runs them all with the sidekick's own lease code "
            "(fluster.lease.Lease: grant, keepalive every TTL/3, on loss grant again and "
            f"write the keys again), TTL 10 s, {r.instances // r.agents} instances per agent "
            f"under {r.leases_per_agent} lease(s) each. Requests = etcd's "
            "`grpc_server_msg_received_total` per second (keepalives included).",
            "Not like the sidekick: it holds one lease per registration. 10,000 of them "
            "(10,000 keepalive streams, 3,000 keepalives a second at TTL 10 s) were more than "
            "one simulating Python process on this machine could keep: its keepalives timed "
            "out at a load average of 26. So the agents here hold one lease each, as a host "
            "agent could; the real fleet's etcd load is the keepalives (next note).",
            "Every lease gone: the agents' leases revoked at once, which is what etcd "
            "restored from a snapshot without its leases leaves. Each agent notices at its "
            "next keepalive (within TTL/3) and grants again after a random hold-off of up "
            "to TTL/3 (fluster.lease, the sidekick's `--reregister-spread`), so a fleet's "
            "re-registrations are spread over two keepalive intervals: on top of the "
            "keepalives, at most a grant and a put per lease per TTL/3, i.e. twice the "
            "steady keepalive rate of a sidekick fleet. The edges' removal guard holds the "
            "mass removal in the meantime (the served count above).",
            "Noticed, not changed: with a lease per registration the steady etcd load is "
            "one keepalive per instance per TTL/3 (10,000 instances: 3,000 a second at TTL "
            "10 s); one lease per host agent would make it one per host (30 a second for "
            "100 hosts), at the price of a host's registrations living and dying together.",
        ],
    )


def f4_row(args: argparse.Namespace, r: fleet.ProxyRun) -> Row:
    def way(name: str) -> str:
        lat = r.rotation_ms.get(name, [])
        return (
            f"etcd CPU {r.etcd_cpu_pct.get(name, 0):.1f} %, {r.watchers.get(name, 0):.0f} "
            f"watchers at etcd, in rotation at all edges p50 {fleet.p50(lat):.1f} ms, "
            f"{r.resyncs.get(name, 0):.0f} watches reopened"
        )

    return Row(
        "F4",
        f"{r.edges} edges watching etcd directly vs through one `etcd grpc-proxy`, same changes",
        "figures (fewer watchers and less etcd CPU through the proxy, for what latency)",
        f"proxy: {way('proxy')}; the proxy's own CPU {r.proxy_cpu_pct:.1f} %",
        f"direct: {way('direct')}",
        "-",
        "n/a",
        row_command(args, "F4"),
        [
            f"{r.changes} changes in all ({r.changes // 2} each way): a new instance of a "
            "served service put, then every edge's admin socket polled until every edge "
            "has it, then 0.2 s. CPU from /proc over that window; watchers = etcd's "
            "`etcd_debugging_mvcc_watcher_total`; watches reopened = the edges' catalog "
            "resyncs and reconnects (a proxy that dropped or starved a stream shows here).",
            "docs/OPERATIONS.md (Sizing a fleet) says when a proxy is worth it.",
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    work = Path(tempfile.mkdtemp(prefix="fluster-bench-"))
    try:
        rows, notes = asyncio.run(run(args, work))
    finally:
        if args.keep:
            print(f"[bench] work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - started
    notes.append(
        f"1-minute load average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the "
        "end (2 cores): above ~0.5 at the start means something else was running too."
    )
    print(report.table(rows))
    for note in notes:
        print(f"- {note}")
    print(f"[bench] {took / 60:.1f} min")
    if not args.no_write:
        doc = report.document(
            rows,
            machine_line=report.machine(),
            command=command.strip(),
            started=started_at,
            took=took,
            notes=notes,
        )
        if set(args.only) != set(ROWS) and args.out.exists():
            run_line = (
                f"rows {', '.join(args.only)} updated by `{command.strip()}`, started "
                f"{started_at}, took {took / 60:.1f} min"
            )
            prefix = f"rows {', '.join(args.only)}: "
            doc = report.merge(
                args.out.read_text(),
                rows,
                order=ROWS,
                run_line=run_line,
                notes=[prefix + n for n in notes],
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(doc)
        print(f"[bench] wrote {args.out}")
    return 0
