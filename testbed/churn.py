"""Records that vanish without draining, under load: the scenarios of issue 22.

Each runs one service of app processes (testbed.app) behind real edges on a real etcd,
with request loops through every edge (keep-alive and new connections), and returns its
figures; the bench prints them (R-CHURN, R-NODE, R-MASS) and the tests assert on them.

- `abrupt_churn`: one instance replaced every `interval` seconds, as a registrator that
  does not drain does it: the new one registered, the old process killed and its record
  deleted at once.
- `node_death`: a node dies with `dead` of the instances: processes and their companion
  sidekicks killed at once, records left to run out with their leases.
- `mass_deletion`: every record of a service deleted while all its processes serve; the
  guard holds them for its hold, then lets them go.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.etcd import Etcd
from testbed.fleet import SERVICE, App, Fleet, Traffic, running
from testbed.process import cpu_with_children
from testbed.reloader import ReloaderProcess
from testbed.servers import registered_up, service_servers
from testbed.waiting import wait_for

KEY = "/fluster/services/{}/instances/{}"


@dataclass
class Figures:
    requests: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    changes: int = 0  # replacements, or instances lost
    holds: int = 0  # times an edge's guard started holding
    cpu_ms_per_apply: float | None = None  # the reloader's, over the scenario
    applies: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def text(self) -> str:
        out = f"{self.failed} failed of {self.requests:,}"
        if self.failures:
            out += f" (first: {self.failures[0]})"
        return out


class Bed:
    """Edges + a fleet of app processes on `etcd`, torn down on leaving."""

    def __init__(
        self, root: Path, etcd: Etcd, *, edges: int = 1, hold: float = 30.0, ttl: int = 10
    ) -> None:
        self.root, self.etcd = root, etcd
        self.fleet = Fleet(etcd, root, ttl=ttl)
        self.edges = [
            ReloaderProcess(etcd, root / f"edge{i}", "--removal-hold", str(hold))
            for i in range(edges)
        ]

    def __enter__(self) -> Bed:
        for edge in self.edges:
            edge.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.fleet.close()
        for edge in self.edges:
            edge.stop()

    def put(self, app: App) -> None:
        """A plain `ip:port` record, as a shell or registrator-style tool writes it."""
        self.etcd.put(KEY.format(SERVICE, app.name), f"127.0.0.1:{app.port}")

    def served(self, want: set[tuple[str, int]], timeout: float = 30.0) -> None:
        wait_for(
            lambda: all(service_servers(e.state_dir, SERVICE) == want for e in self.edges),
            timeout=timeout,
            interval=0.02,
            what=f"every edge serving {sorted(want)} (logs in {self.root})",
        )

    def counters(self) -> tuple[float, int, int]:
        """(reloader CPU seconds, applies that changed something, holds started), all edges."""
        cpu, applies, holds = 0.0, 0, 0
        for edge in self.edges:
            assert edge.proc is not None
            cpu += cpu_with_children(edge.proc.pid)
            metrics = edge.metrics()
            applies += int(
                sum(v for k, v in metrics.items() if k.startswith("reloader_applies_total{"))
                - metrics.get('reloader_applies_total{kind="noop"}', 0)
            )
            holds += int(metrics.get("reloader_removal_holds_total", 0))
        return cpu, applies, holds

    def measure(
        self,
        loads: list[Traffic],
        before: tuple[float, int, int],
        since: float,
        until: float = float("inf"),
    ) -> Figures:
        """The figures since `before` (`self.counters()` then); failures until `until`."""
        cpu, applies, holds = self.counters()
        failures = sorted(f for load in loads for f in load.failed_at if f[0] < until)
        figures = Figures(
            requests=sum(load.ok for load in loads) + len(failures),
            failed=len(failures),
            failures=[f"{at - since:+.2f}s {why}" for at, why in failures[:10]],
            holds=holds - before[2],
            applies=applies - before[1],
        )
        if figures.applies:
            figures.cpu_ms_per_apply = 1000 * (cpu - before[0]) / figures.applies
        return figures


def abrupt_churn(
    root: Path, etcd: Etcd, *, interval: float, seconds: float, instances: int = 4, edges: int = 1
) -> Figures:
    with Bed(root, etcd, edges=edges) as bed:
        for _ in range(instances):
            bed.put(bed.fleet.add(sidekick=False))
        bed.served(bed.fleet.expected)
        loads = [Traffic(edge, seconds + 120) for edge in bed.edges]
        with running(loads):
            before = bed.counters()
            started = time.monotonic()
            replaced = 0
            while time.monotonic() - started < seconds:
                tick = time.monotonic()
                new = bed.fleet.add(sidekick=False)
                bed.put(new)
                old = bed.fleet.apps[0]
                bed.fleet.kill(old)
                bed.etcd.delete(KEY.format(SERVICE, old.name))
                replaced += 1
                time.sleep(max(0.0, interval - (time.monotonic() - tick)))  # the pace
            bed.served(bed.fleet.expected)
            figures = bed.measure(loads, before, started)
        figures.changes = replaced
        return figures


def node_death(
    root: Path,
    etcd: Etcd,
    *,
    instances: int = 4,
    dead: int = 3,
    after: float = 45.0,
    ttl: int = 10,
    edges: int = 1,
) -> Figures:
    """Figures from the kill until `after` seconds later (the leases run out within)."""
    with Bed(root, etcd, ttl=ttl, edges=edges) as bed:
        for _ in range(instances):
            bed.fleet.add()
        bed.served(bed.fleet.expected)
        loads = [Traffic(edge, after + 120) for edge in bed.edges]
        with running(loads):
            before = bed.counters()
            started = time.monotonic()
            for app in list(bed.fleet.apps[:dead]):
                bed.fleet.kill(app)
            wait_for(
                lambda: registered_up(etcd.endpoint_list, SERVICE) == bed.fleet.expected,
                timeout=30,
                what="the dead instances' leases to run out",
            )
            expired = time.monotonic() - started
            time.sleep(max(0.0, after - (time.monotonic() - started)))  # the window measured
            figures = bed.measure(loads, before, started)
        figures.changes = dead
        figures.extra["leases_ran_out_s"] = expired
        figures.extra["in_flight_bound"] = sum(len(load.threads) for load in loads)
        return figures


def mass_deletion(
    root: Path, etcd: Etcd, *, instances: int = 6, hold: float = 10.0, edges: int = 1
) -> Figures:
    """Figures within the hold; `extra["released_s"]`: when the edges let them go."""
    with Bed(root, etcd, hold=hold, edges=edges) as bed:
        for _ in range(instances):
            bed.put(bed.fleet.add(sidekick=False))
        everyone = bed.fleet.expected
        bed.served(everyone)
        loads = [Traffic(edge, hold + 120) for edge in bed.edges]
        with running(loads):
            before = bed.counters()
            started = time.monotonic()
            etcd.delete(KEY.format(SERVICE, ""), prefix=True)
            # Held: every edge still serves them all, until the hold runs out.
            wait_for(
                lambda: all(e.status()["held_removals"] == instances for e in bed.edges),
                timeout=hold,
                what=f"{instances} removals held on every edge",
            )
            bed.served(everyone, timeout=hold)
            wait_for(
                lambda: all(not service_servers(e.state_dir, SERVICE) for e in bed.edges),
                timeout=hold + 30,
                interval=0.02,
                what="the held servers gone after the hold",
            )
            released = time.monotonic() - started
            # What failed within the hold: without a server or record, it answers 404 after.
            figures = bed.measure(loads, before, started, until=started + released - 0.5)
        figures.changes = instances
        figures.extra["released_s"] = released
        return figures
