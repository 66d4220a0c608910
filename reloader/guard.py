"""The blast-radius guard: do not let a lost registry empty a backend by accident.

When leases expire en masse (an etcd partition, a sidekick fleet restart, a stray
`etcdctl del --prefix`), the registry briefly says most instances are gone while the
containers are still serving. Removing them all from HAProxy turns an etcd hiccup into
an outage. So the guard judges each service's **capacity**: when the instances it would
keep fall more than `max_removal_pct` percent below the most it had within the last
`hold` seconds, the removed servers HAProxy still has are held (kept in HAProxy) for at
most `hold` seconds, loudly logged. A service that keeps its number of instances
(replacements, rolling restarts, scaling) is never held, however many records come and
go: a replacement counts as much as the removal it replaces.

A held server is never a black hole: HAProxy observes every server (reloader.model
`OBSERVE`) and takes one out of rotation at its first refused connection, the request
going to another server, while a live one keeps serving.
A hold ends when it runs out, when the service's capacity is back (new instances came),
or when the instance comes back; a hold that ran out is final (the server is gone from
HAProxy, so nothing is left to hold).

Capacity is the instances HAProxy has or is given that are routed and up, plus records
the sidekick is draining: those are deliberate work in progress (a host agent
re-registering its containers drains the old records first), and the deletion of a
draining record lowers the bar by one, as scaling down does. Not guarded at all, because
they are someone's decision: removals from a changed `active_version`/`canary` (an
operator promotion or rollback).

The cost follows the change: only services whose objects changed, or that hold
something, are looked at, each in O(its instances).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from types import MappingProxyType

import structlog

from fluster.catalog import Service, Snapshot, changed_services
from fluster.records import Instance
from reloader.model import Backend

log = structlog.get_logger("reloader.guard")


@dataclass(frozen=True, slots=True)
class Held:
    instance: Instance
    since: float


class LiveServers(Mapping[str, AbstractSet[str]]):
    """Service -> the names of the servers HAProxy has now (the guard's `live`), worked
    out for a service only when asked: the guard asks about the services that changed,
    so a membership change does not list every server of the catalog (issue 15).

    `index` (service -> the positions of its backends in `backends`, see
    `service_index`) can be kept by the caller while the backends stay where they are."""

    def __init__(
        self, backends: Sequence[Backend], index: Mapping[str, list[int]] | None = None
    ) -> None:
        self._backends = backends
        self._index = service_index(backends) if index is None else index

    def __getitem__(self, service: str) -> AbstractSet[str]:
        return {s.name for i in self._index[service] for s in self._backends[i].servers}

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def service_index(backends: Iterable[Backend]) -> dict[str, list[int]]:
    """Service -> the positions of its backends."""
    index: dict[str, list[int]] = {}
    for i, backend in enumerate(backends):
        if backend.service:
            index.setdefault(backend.service, []).append(i)
    return index


Level = tuple[float, int]  # (clock time, the service's capacity from then on)


class RemovalGuard:
    def __init__(
        self,
        max_removal_pct: float = 50.0,
        hold: float = 30.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_removal_pct = max_removal_pct
        self.hold = hold
        self.enabled = enabled
        self.clock = clock
        self.held: dict[tuple[str, str], Held] = {}
        self.holds_started = 0  # times a service started holding (a counter for /metrics)
        # Service -> its capacity over the last `hold` seconds: the level at the window's
        # start, then every change within it.
        self._levels: dict[str, list[Level]] = {}
        # Service -> (the catalog's object, the held names, the object with them): a
        # hold that goes on keeps handing out the same object, so the model's per-service
        # memos see no change and an apply costs what the change costs.
        self._patched: dict[str, tuple[Service | None, frozenset[str], Service]] = {}

    def next_release(self) -> float | None:
        """Clock time of the earliest hold expiry, so the caller can apply again then."""
        return min((h.since + self.hold for h in self.held.values()), default=None)

    def filter(
        self,
        snapshot: Snapshot,
        applied: Snapshot | None,
        live: Mapping[str, AbstractSet[str]] | None = None,
    ) -> Snapshot:
        """`snapshot` with guarded removals put back, relative to the last `applied` one.

        `live`: service -> the names of the servers HAProxy has now. The guard compares
        against that (what a removal would actually take away), not against what the
        spec routes: a fallback version's servers count, a server left out for a bad
        target does not. Without it, the routed instances of `applied` stand in."""
        if not self.enabled or applied is None:
            self.held.clear()
            self._levels.clear()
            self._patched.clear()
            return snapshot
        now = self.clock()
        keep: dict[tuple[str, str], Held] = {}
        # A service whose object is the one applied (the catalog keeps an unchanged
        # service's object) has nothing removed: only the changed ones are looked at, so
        # the cost follows the change, not the catalog (issue 15).
        changed = changed_services(applied, snapshot)
        for name in sorted(changed | {k[0] for k in self.held}):
            before, after = applied.services.get(name), snapshot.services.get(name)
            if before is not None and after is not None and _promoted(before, after):
                self._levels[name] = [(now, _capacity(before, after, set(after.routed())))]
                continue
            if before is None:
                have: AbstractSet[str] = set()
            elif live is None:
                have = before.routed().keys()
            else:
                have = live.get(name, frozenset())
            present = after.instances if after is not None else {}
            old = before.instances if before is not None else {}
            gone = [i for i in old if i in have and i not in present]
            capacity = _capacity(before, after, have)
            peak = self._peak(name, before, after, have, capacity, now)
            if not gone or 100.0 * (peak - capacity) <= self.max_removal_pct * peak:
                continue  # capacity kept (or back): whatever was held goes now
            started = 0
            for inst_name in gone:
                running = self.held.get((name, inst_name))
                if running is None:
                    running = Held(old[inst_name], now)
                    started += 1
                if now - running.since < self.hold:
                    keep[(name, inst_name)] = running
            if started:
                self.holds_started += 1
                log.error(
                    "blast-radius guard: holding removals",
                    service=name,
                    capacity=capacity,
                    peak=peak,
                    held=len([k for k in keep if k[0] == name]),
                    max_removal_pct=self.max_removal_pct,
                    hold_s=self.hold,
                    revision=snapshot.revision,
                )
        for name in self._levels.keys() - snapshot.services.keys() - {k[0] for k in keep}:
            del self._levels[name]  # a service gone for good
        self.held = keep
        return self._with_held(snapshot, applied) if keep else snapshot

    def _peak(
        self,
        name: str,
        before: Service | None,
        after: Service | None,
        have: AbstractSet[str],
        capacity: int,
        now: float,
    ) -> int:
        """Record `capacity` as the service's level from `now` on; the most it had
        within the last `hold` seconds."""
        levels = self._levels.get(name)
        if levels is None:  # first seen: what HAProxy has, and the records being drained
            levels = [(now, len(have) + _draining(before))]
        # Draining records that went were retired on purpose: the bar comes down with them.
        went = (
            sum(
                1
                for i, inst in before.instances.items()
                if inst.state == "draining" and (after is None or i not in after.instances)
            )
            if before is not None
            else 0
        )
        if went:
            levels = [(t, max(0, c - went)) for t, c in levels]
        start = now - self.hold
        older = [lv for lv in levels if lv[0] < start]
        levels = older[-1:] + [lv for lv in levels if lv[0] >= start] + [(now, capacity)]
        self._levels[name] = levels
        return max(c for _, c in levels)

    def _with_held(self, snapshot: Snapshot, applied: Snapshot) -> Snapshot:
        held: dict[str, dict[str, Instance]] = {}
        for (name, inst_name), h in sorted(self.held.items()):
            held.setdefault(name, {})[inst_name] = h.instance
        services = dict(snapshot.services)
        layout = snapshot.layout
        patched: dict[str, tuple[Service | None, frozenset[str], Service]] = {}
        for name, instances in held.items():
            source = snapshot.services.get(name)
            names = frozenset(instances)
            kept = self._patched.get(name)
            if kept is None or kept[0] is not source or kept[1] != names:
                if source is None:
                    previous = applied.services.get(name)
                    base = replace(previous, instances={}) if previous else Service(name)
                else:
                    base = source
                merged = dict(sorted({**base.instances, **instances}.items()))
                kept = (
                    source,
                    names,
                    replace(base, instances=MappingProxyType(merged)),
                )
            if source is None:
                layout = 0  # a service the catalog no longer has: not the catalog's layout
            patched[name] = kept
            services[name] = kept[2]
        self._patched = patched
        if layout == 0:
            services = dict(sorted(services.items()))
        # Not the catalog's snapshot any more: its change log does not describe this one.
        return replace(
            snapshot, services=MappingProxyType(services), layout=layout, seq=0, changes=None
        )


def _draining(svc: Service | None) -> int:
    if svc is None:
        return 0
    return sum(1 for inst in svc.instances.values() if inst.state == "draining")


def _capacity(before: Service | None, after: Service | None, have: AbstractSet[str]) -> int:
    """The instances `after` leaves in rotation: routed and up, and either in HAProxy
    already or new (a record HAProxy left out before, say a bad target, stays out), plus
    the records being drained. Held instances are not in `after`: they never count."""
    if after is None:
        return 0
    old = before.instances if before is not None else {}
    up = sum(1 for i, inst in after.routed().items() if i in have or old.get(i) is not inst)
    return up + _draining(after)


def _promoted(before: Service, after: Service) -> bool:
    return (before.spec.active_version, before.spec.canary) != (
        after.spec.active_version,
        after.spec.canary,
    )
