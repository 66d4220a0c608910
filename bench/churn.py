"""R-CHURN, R-NODE, R-MASS, R-CHAOS: records that vanish without draining, and the chaos
soak, on a 3-member etcd of their own (testbed/churn.py and testbed/chaos.py do the
work; this module turns their figures into rows)."""

from __future__ import annotations

from pathlib import Path

from bench.report import Row
from testbed import churn
from testbed.chaos import Soak
from testbed.etcd import Etcd
from testbed.hostagent import docker_usable


def _etcd(work: Path, name: str) -> Etcd:
    return Etcd(work / name / "etcd", size=3).start()


def churn_row(command: str, work: Path, seconds: float) -> Row:
    runs = {}
    for interval in (1.0, 5.0):
        etcd = _etcd(work, f"churn-{interval:g}")
        try:
            runs[interval] = churn.abrupt_churn(
                work / f"churn-{interval:g}", etcd, interval=interval, seconds=seconds
            )
        finally:
            etcd.stop()
    ok = all(f.failed <= f.changes and f.holds == 0 for f in runs.values())
    cpu = runs[1.0].cpu_ms_per_apply
    ok = ok and cpu is not None and cpu <= 5.0
    parts = [
        f"1/s: {f.failed} failed of {f.requests:,} over {f.changes} replacements, "
        f"{f.holds} holds, {f.cpu_ms_per_apply or 0:.1f} ms CPU/change"
        if interval == 1.0
        else f"1/5 s: {f.failed} failed of {f.requests:,} over {f.changes}, {f.holds} holds"
        for interval, f in runs.items()
    ]
    return Row(
        "R-CHURN",
        f"4 instances, one replaced abruptly per second and per 5 s for {seconds:.0f} s "
        "(new record put, old process SIGKILLed and its record deleted)",
        "<= 1 failed per replacement, 0 holds; <= 5 ms CPU per change",
        "; ".join(parts),
        verdict="yes" if ok else "**no**",
        command=command,
        notes=[
            "One edge (reloader + HAProxy) on a 3-member etcd; app processes from "
            "testbed/app.py with plain `ip:port` records (what a shell or registrator-style "
            "tool writes); request loops with and without keep-alive through the edge. CPU "
            "per change = the reloader process and the children it waited for, over the run, "
            "divided by the applies that changed something (each replacement is two).",
            "Before (main at e65c312, the same harness, a busy machine): 1/s 10,083 failed of "
            "27,210 (37 %), 26 holds, 40.5 ms CPU per change.",
            *(f.failures[0] for f in runs.values() if f.failures),
        ],
    )


def node_row(command: str, work: Path) -> Row:
    etcd = _etcd(work, "node")
    try:
        f = churn.node_death(work / "node", etcd)
    finally:
        etcd.stop()
    bound = f.extra["in_flight_bound"]
    return Row(
        "R-NODE",
        "a node dies with 3 of a service's 4 instances (processes and companion sidekicks "
        "SIGKILLed, leases run out a TTL later); the 45 s after",
        f"only requests in flight on the dead processes (<= {bound:.0f} request loops)",
        f"{f.failed} failed of {f.requests:,}; leases ran out after "
        f"{f.extra['leases_ran_out_s']:.1f} s; {f.holds} holds",
        verdict="yes" if f.failed <= bound else "**no**",
        command=command,
        notes=[
            "TTL 10 s (the sidekick's default). Before (main at e65c312, same harness): "
            "5,132 failed of 21,892.",
            *f.failures[:3],
        ],
    )


def mass_row(command: str, work: Path) -> Row:
    etcd = _etcd(work, "mass")
    try:
        f = churn.mass_deletion(work / "mass", etcd, hold=10.0)
    finally:
        etcd.stop()
    return Row(
        "R-MASS",
        "every record of a 6-instance service deleted while its processes serve "
        "(`--removal-hold 10`)",
        "0 failed within the hold; gone after it",
        f"{f.failed} failed of {f.requests:,}; released after {f.extra['released_s']:.1f} s; "
        f"{f.holds} hold",
        verdict="yes" if f.failed == 0 and f.holds == 1 else "**no**",
        command=command,
    )


def chaos_row(command: str, work: Path, minutes: float) -> Row:
    etcd = _etcd(work, "chaos")
    agent = docker_usable()
    soak = Soak(work / "chaos", etcd, edges=2, instances=4, ttl=5, agent=agent)
    try:
        soak.start()
        report = soak.run(60 * minutes)
    finally:
        soak.close()
        etcd.stop()
    problems = report.violations(converge_s=2.0)
    rows = report.by_kind()
    per_kind = ", ".join(f"{k} {r['failed']:.0f}/{r['events']:.0f}" for k, r in rows.items())
    rss = "; ".join(f"{k} {a:.1f} -> {b:.1f} MB" for k, (a, b) in sorted(report.rss.items()))
    kinds = [
        f"{k}: {r['events']:.0f} events, {r['failed']:.0f} failed (at most "
        f"{r['max_failed']:.0f} in one), {r['holds']:.0f} holds, quiet within "
        f"{r['max_quiet_s']:.2f} s, edges == etcd {r['max_converge_s']:.2f} s after"
        + (
            f", HAProxy serving again within {r['max_restart_s']:.2f} s"
            if "max_restart_s" in r
            else ""
        )
        for k, r in rows.items()
    ]
    return Row(
        "R-CHAOS",
        f"chaos soak, {minutes:g} min: {len(report.events)} random events of "
        f"{len(soak.kinds)} kinds under load through 2 edges",
        "failed: only in flight on a killed process; edges == etcd <= 2 s after quiet; "
        "holds only on mass deletion; RSS flat",
        f"{report.failed} failed of {report.requests:,} (failed/events per kind: {per_kind}); "
        f"{len(problems)} invariant violations",
        verdict="yes" if not problems else "**no**",
        command=command,
        notes=[
            f"seed {report.seed}, {report.seconds:.0f} s; per kind (each failure counts "
            "against the event before it):",
            *kinds,
            f"RSS at the start and the end: {rss}.",
            "haproxy-kill: the HTTP port is the reloader's socket, lent to HAProxy, so "
            "connections wait in its backlog until the new HAProxy serves; before that "
            "(main at e65c312 + this harness), 22 kills cost 22,959 refused connections.",
            *problems[:10],
            *(
                []
                if agent
                else ["No Docker engine with the base image here: no host agent, no agent-kill."]
            ),
        ],
    )
