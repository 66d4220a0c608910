"""The chaos soak: a real cluster killed and churned under HTTP load, with invariants.

One service's instances are app processes (testbed.app), each registered by its own
static sidekick (a companion: killed with its app, its record stays until the lease runs
out, as when a node dies). Edges are real reloaders with their HAProxy; etcd is a real
3-member cluster. While request loops run through every edge (keep-alive and a new
connection per request at once), random events follow one another:

    kill           the app and its sidekick SIGKILLed (no drain), a replacement started
    stop           a graceful stop (the sidekick drains and deregisters), a replacement
    scale-up       one more instance            scale-down   one fewer, gracefully
    sidekick-kill  a sidekick SIGKILLed and started again beside its running app
    wipe           every record of the service deleted while its processes serve
    reloader-kill  an edge's reloader SIGKILLed and started again
    haproxy-kill   an edge's HAProxy worker SIGKILLed (the reloader starts HAProxy again,
                   `restart_s`; the HTTP port is the reloader's socket, so connections
                   wait in its backlog meanwhile)
    etcd-kill      an etcd member SIGKILLed, started again 2 s later
    etcd-leader-kill  the same for the leader
    etcd-pause     an etcd member stopped (SIGSTOP) for 5 s
    agent-kill     a host agent (`sidekick --all`) SIGKILLed and started again while its
                   containers serve (with `agent=True`: testbed/hostagent.py)

After each event the soak waits for quiet (etcd's up records are the instances alive)
and measures how long until every edge's HAProxy has exactly those servers. Figures per
event kind: failed requests (each failure belongs to the event before it), the slowest
convergence, guard holds; and the reloaders' and HAProxys' memory at the start and end.
`violations()` states the invariants; the bench prints the table, a test asserts them.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.etcd import Etcd
from testbed.fleet import SERVICE, Fleet, Traffic, running
from testbed.hostagent import HostAgentGroup
from testbed.reloader import ReloaderProcess
from testbed.servers import Address, registered_up, service_servers
from testbed.waiting import Compared, wait_for

KINDS = (
    "kill",
    "stop",
    "scale-up",
    "scale-down",
    "sidekick-kill",
    "wipe",
    "reloader-kill",
    "haproxy-kill",
    "etcd-kill",
    "etcd-leader-kill",
    "etcd-pause",
    "agent-kill",
)
# Events that kill a process serving requests: what was in flight on it may fail.
ABRUPT = frozenset({"kill", "haproxy-kill"})
# Events that delete live records in bulk: the only ones the guard may hold for. An etcd
# member frozen for at least the TTL is one too: the sidekicks whose keepalive streams
# hang on it lose their leases together (a lease storm), and holding is the guard's job.
MASS_DELETION = frozenset({"wipe"})
PAUSE_S = 5.0


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Event:
    kind: str
    start: float
    quiet_s: float = 0.0  # from the start until etcd's records were the instances alive
    converge_s: float = 0.0  # from then until every edge's HAProxy had exactly those
    holds: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)  # (s after start, why)
    restart_s: float | None = None  # haproxy-kill: until a new HAProxy served a request


@dataclass
class Report:
    seed: int
    seconds: float
    events: list[Event]
    requests: int
    failed: int
    rss: dict[str, tuple[float, float]]  # process -> (MB at start, MB at end)
    concurrency: int  # request loops: a bound on what can be in flight at once
    logs: Path
    may_hold: frozenset[str] = MASS_DELETION  # event kinds the guard may hold for

    def by_kind(self) -> dict[str, dict[str, float]]:
        rows: dict[str, dict[str, float]] = {}
        for ev in self.events:
            row = rows.setdefault(
                ev.kind,
                {"events": 0, "failed": 0, "max_failed": 0, "holds": 0},
            )
            row["events"] += 1
            row["failed"] += len(ev.failures)
            row["max_failed"] = max(row["max_failed"], len(ev.failures))
            row["holds"] += ev.holds
            if ev.restart_s is not None:
                row["max_restart_s"] = max(row.get("max_restart_s", 0.0), ev.restart_s)
            row["max_converge_s"] = max(row.get("max_converge_s", 0.0), ev.converge_s)
            row["max_quiet_s"] = max(row.get("max_quiet_s", 0.0), ev.quiet_s)
        return dict(sorted(rows.items()))

    def violations(self, converge_s: float = 2.0) -> list[str]:
        """The soak's invariants, each broken one said with its figures."""
        out = []
        for i, ev in enumerate(self.events):
            where = f"event {i} {ev.kind} at {ev.start:.1f}s"
            failures = ev.failures
            allowed = self.concurrency if ev.kind in ABRUPT else 0
            if len(failures) > allowed:
                shown = [f"{at:+.2f}s {why}" for at, why in failures[:5]]
                out.append(f"{where}: {len(failures)} failed > {allowed}: {shown}")
            if ev.holds and ev.kind not in self.may_hold:
                out.append(f"{where}: the guard held removals ({ev.holds} holds)")
            if ev.converge_s > converge_s:
                out.append(f"{where}: edges equal etcd {ev.converge_s:.2f}s after quiet")
        return out


class Soak:
    def __init__(
        self,
        root: Path,
        etcd: Etcd,
        *,
        edges: int = 2,
        instances: int = 4,
        ttl: int = 5,
        kinds: tuple[str, ...] = KINDS,
        seed: int | None = None,
        agent: bool = False,
    ) -> None:
        self.root, self.etcd = root, etcd
        self.kinds = kinds if agent else tuple(k for k in kinds if k != "agent-kill")
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.size = instances
        self.deck: list[str] = []
        self.fleet = Fleet(etcd, root, ttl)
        self.agent = HostAgentGroup(etcd, root, ttl) if agent else None
        self.edges = [
            ReloaderProcess(etcd, root / f"edge{i}", "--removal-hold", "10") for i in range(edges)
        ]
        self.clock0 = time.monotonic()

    # -- setting up ----------------------------------------------------------------

    def start(self) -> None:
        for edge in self.edges:
            edge.start()
        for _ in range(self.size):
            self.fleet.add()
        if self.agent is not None:
            self.agent.start()
        self.settle(timeout=60)

    def close(self) -> None:
        self.fleet.close()
        if self.agent is not None:
            self.agent.close()
        for edge in self.edges:
            edge.stop()

    # -- observing -----------------------------------------------------------------

    def expected(self) -> dict[str, set[Address]]:
        """Service -> the addresses of its live instances."""
        out = {SERVICE: self.fleet.expected}
        if self.agent is not None:
            out[self.agent.service] = self.agent.expected
        return out

    def registered(self) -> dict[str, set[Address] | None]:
        return {svc: registered_up(self.etcd.endpoint_list, svc) for svc in self.expected()}

    def served(self) -> dict[str, dict[str, set[Address]]]:
        """Edge -> service -> the servers it routes to ({} while it has no HAProxy)."""
        out: dict[str, dict[str, set[Address]]] = {}
        for i, edge in enumerate(self.edges):
            try:
                out[f"edge{i}"] = {
                    svc: service_servers(edge.state_dir, svc) for svc in self.expected()
                }
            except OSError:
                out[f"edge{i}"] = {}  # between HAProxys
        return out

    def settle(self, timeout: float = 45.0) -> tuple[float, float]:
        """Wait until etcd's up records are the live instances (quiet), then until every
        edge has exactly those servers; the clock times of both."""
        want = self.expected()
        wait_for(
            lambda: self.registered() == want,
            timeout=timeout,
            interval=0.05,
            what=f"etcd's up records == the live instances {want} (logs in {self.root})",
        )
        quiet = time.monotonic()
        edges = {f"edge{i}": want for i in range(len(self.edges))}
        wait_for(
            lambda: Compared("edge -> service -> servers", self.served(), edges),
            timeout=timeout,
            interval=0.02,
            what=f"every edge's servers == etcd's (logs in {self.root})",
        )
        return quiet, time.monotonic()

    def holds(self) -> int:
        total = 0
        for edge in self.edges:
            with contextlib.suppress(OSError):  # an edge being started again counts 0
                total += int(edge.metrics().get("reloader_removal_holds_total", 0))
        return total

    def rss(self) -> dict[str, float]:
        out = {}
        for i, edge in enumerate(self.edges):
            if edge.proc is not None:
                out[f"edge{i} reloader"] = rss_mb(edge.proc.pid)
            with contextlib.suppress(OSError, AssertionError):
                out[f"edge{i} haproxy"] = sum(rss_mb(pid) for pid in edge.workers())
        return out

    # -- events --------------------------------------------------------------------

    def choose(self) -> str:
        """The next event: every kind once per round, in a random order, so that even a
        short run meets each of them (scaling only within `instances` +- 2)."""
        if not self.deck:
            self.deck = list(self.kinds)
            self.rng.shuffle(self.deck)
        kind = self.deck.pop()
        if kind == "scale-up" and len(self.fleet.apps) >= self.size + 2:
            return "scale-down"
        if kind == "scale-down" and len(self.fleet.apps) <= self.size - 2:
            return "scale-up"
        return kind

    def act(self, kind: str) -> float | None:
        """Make one event happen; for haproxy-kill, the seconds until HAProxy served again."""
        started = time.monotonic()
        rng, fleet = self.rng, self.fleet
        if kind == "kill":
            fleet.kill(rng.choice(fleet.apps))
            fleet.add()
        elif kind == "stop":
            fleet.stop(rng.choice(fleet.apps))
            fleet.add()
        elif kind == "scale-up":
            fleet.add()
        elif kind == "scale-down":
            fleet.stop(rng.choice(fleet.apps))
        elif kind == "sidekick-kill":
            fleet.kill_sidekick(rng.choice(fleet.apps))
        elif kind == "wipe":
            self.etcd.delete(f"/fluster/services/{SERVICE}/instances/", prefix=True)
        elif kind == "reloader-kill":
            edge = rng.choice(self.edges)
            assert edge.proc is not None
            edge.proc.kill()
            edge.proc.wait(10)
            edge.start()
        elif kind == "haproxy-kill":
            edge = rng.choice(self.edges)
            old = edge.haproxy_pid()
            os.kill(rng.choice(edge.workers()), signal.SIGKILL)
            wait_for(
                lambda: edge.haproxy_pid() != old and _serves(edge),
                timeout=30,
                interval=0.005,
                what=f"a new HAProxy serving (logs in {edge.log_path})",
            )
            return time.monotonic() - started
        elif kind in ("etcd-kill", "etcd-leader-kill"):
            member = (
                self.etcd.leader() if kind == "etcd-leader-kill" else rng.choice(self.etcd.members)
            )
            member.kill()
            time.sleep(2)  # the member stays down this long: the fault itself
            member.start(self.etcd.initial_cluster, state="existing")
            self.etcd.wait_healthy()
        elif kind == "agent-kill":
            assert self.agent is not None
            self.agent.kill_agent()
        elif kind == "etcd-pause":
            member = rng.choice(self.etcd.members)
            member.pause()
            time.sleep(PAUSE_S)  # the fault itself
            member.resume()
        else:
            raise ValueError(f"unknown event kind {kind!r}")
        return None

    def run(self, seconds: float) -> Report:
        """Events one after another for `seconds`, under load through every edge."""
        loads = [
            Traffic(edge, seconds + 300, service)
            for edge in self.edges
            for service in self.expected()
        ]
        events: list[Event] = []
        rss_start = self.rss()
        started = time.monotonic()
        with running(loads):
            self.settle()
            while time.monotonic() - started < seconds:
                holds = self.holds()
                ev = Event(self.choose(), time.monotonic())
                ev.restart_s = self.act(ev.kind)
                quiet, converged = self.settle()
                ev.quiet_s, ev.converge_s = quiet - ev.start, converged - quiet
                ev.holds = max(0, self.holds() - holds)
                events.append(ev)
                time.sleep(self.rng.uniform(0.2, 1.0))  # load between events, not a wait
            self.settle()
        ended = time.monotonic()
        rss_end = self.rss()
        failures = sorted(f for load in loads for f in load.failed_at)
        self._attribute(events, failures, ended)
        requests = sum(load.ok for load in loads) + len(failures)
        return Report(
            self.seed,
            ended - started,
            events,
            requests,
            len(failures),
            {k: (rss_start.get(k, 0.0), v) for k, v in rss_end.items()},
            sum(len(load.threads) for load in loads),
            self.root,
            MASS_DELETION | ({"etcd-pause"} if self.fleet.ttl <= PAUSE_S else set()),
        )

    @staticmethod
    def _attribute(events: list[Event], failures: list[tuple[float, str]], end: float) -> None:
        """Each failure belongs to the event it follows (until the next one starts)."""
        bounds = [ev.start for ev in events[1:]] + [end]
        for ev, until in zip(events, bounds, strict=True):
            ev.failures = [(at - ev.start, why) for at, why in failures if ev.start <= at < until]


def _serves(edge: ReloaderProcess) -> bool:
    try:
        return edge.get(f"{SERVICE}.localhost")[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def summary(report: Report) -> str:
    lines = [
        f"chaos soak: seed {report.seed}, {report.seconds:.0f} s, {len(report.events)} events, "
        f"{report.requests} requests, {report.failed} failed (logs in {report.logs})",
        f"{'event':<17}{'n':>4}{'failed':>8}{'max/ev':>8}{'holds':>7}{'quiet s':>9}"
        f"{'conv s':>8}{'restart s':>10}",
    ]
    for kind, row in report.by_kind().items():
        restart = f"{row['max_restart_s']:>10.2f}" if "max_restart_s" in row else f"{'-':>10}"
        lines.append(
            f"{kind:<17}{row['events']:>4.0f}{row['failed']:>8.0f}{row['max_failed']:>8.0f}"
            f"{row['holds']:>7.0f}{row['max_quiet_s']:>9.2f}{row['max_converge_s']:>8.2f}{restart}"
        )
    for name, (a, b) in sorted(report.rss.items()):
        lines.append(f"RSS {name}: {a:.1f} -> {b:.1f} MB")
    for i, ev in enumerate(report.events):
        if ev.failures:
            shown = "; ".join(f"{at:+.2f}s {why}" for at, why in ev.failures[:3])
            lines.append(f"event {i} {ev.kind}: {len(ev.failures)} failed: {shown}")
    return "\n".join(lines)
