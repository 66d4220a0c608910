"""The blast-radius guard: do not let one apply empty a backend by accident.

When leases expire en masse (an etcd partition, a sidekick fleet restart, a stray
`etcdctl del --prefix`), the registry briefly says most instances are gone while the
containers are still serving. Removing them all from HAProxy turns an etcd hiccup into
an outage. So when the removals of one apply, together with those applied in the last
`hold` seconds (leases expire over a TTL, not at once), come to more than
`max_removal_pct` percent of a service's servers, the ones HAProxy still has are held
(kept in HAProxy) for `hold` seconds, loudly logged. Instances that come
back end their hold; a hold that ran out is final.

Not guarded, because they are someone's deliberate decision:
- removals from a changed `active_version`/`canary` (an operator promotion or rollback);
- instances that still exist but turned `draining` (the sidekick is retiring them); they
  also count in the share's base, so the removal of the one dead container beside
  records being drained and registered again is not a mass removal.

The share is taken of what HAProxy has (the live config's servers), and only servers
HAProxy still has are held: a removal already applied counts towards the share but is
never put back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from types import MappingProxyType

import structlog

from fluster.catalog import Service, Snapshot
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
        self.removed: dict[tuple[str, str], Held] = {}  # removals applied within `hold`

    def next_release(self) -> float | None:
        """Clock time of the earliest hold expiry, so the caller can apply again then."""
        return min((h.since + self.hold for h in self.held.values()), default=None)

    def filter(
        self,
        snapshot: Snapshot,
        applied: Snapshot | None,
        live: Mapping[str, AbstractSet[str]] | None = None,
    ) -> Snapshot:
        """`snapshot` with guarded removals put back, relative to the last `applied` one
        and to the removals applied within the last `hold` seconds.

        `live`: service -> the names of the servers HAProxy has now. The guard compares
        against that (what a removal would actually take away), not against what the
        spec routes: a fallback version's servers count, a server left out for a bad
        target does not. Without it, the routed instances of `applied` stand in."""
        if not self.enabled or applied is None:
            self.held.clear()
            self.removed.clear()
            return snapshot
        now = self.clock()
        self.removed = {k: r for k, r in self.removed.items() if now - r.since < self.hold}
        keep: dict[tuple[str, str], Held] = {}
        # A service whose object is the one applied (the catalog keeps an unchanged
        # service's object) has nothing removed: only the changed ones are looked at, so
        # the cost follows the change, not the catalog (issue 15).
        changed = {n for n, s in applied.services.items() if snapshot.services.get(n) is not s}
        for name in sorted(changed | {k[0] for k in self.removed}):
            before, after = applied.services.get(name), snapshot.services.get(name)
            if before is not None and after is not None and _promoted(before, after):
                continue
            if before is None:
                previous = {}
            elif live is None:
                previous = before.routed()
            else:
                have = live.get(name, frozenset())
                previous = {i: inst for i, inst in before.instances.items() if i in have}
            present = after.instances if after is not None else {}
            gone = {i: inst for i, inst in previous.items() if i not in present}
            # Leases expire over a TTL, not at once: removals applied a moment ago count.
            earlier = {
                i: r.instance
                for (svc, i), r in self.removed.items()
                if svc == name and i not in present and i not in previous
            }
            # Records the sidekick is draining are its deliberate work in progress (a host
            # agent re-registering its containers after a dockerd restart drains the old
            # records first): they count in the base, so the one dead container removed
            # beside them is not "all of them".
            draining = (
                {i for i, inst in before.instances.items() if inst.state == "draining"}
                - previous.keys()
                if before is not None
                else set()
            )
            base = len(previous) + len(draining) + len(earlier)
            share = 100.0 * (len(gone) + len(earlier)) / base if base else 0.0
            if not gone or share <= self.max_removal_pct:
                # Below the threshold now (some came back): running holds still run out.
                for key, held in self.held.items():
                    if key[0] == name and key[1] in gone and now - held.since < self.hold:
                        keep[key] = held
            else:
                # Only what HAProxy still has is held: a removal applied earlier counts
                # towards the share but its server is never put back.
                started = []
                for inst_name, inst in gone.items():
                    running = self.held.get((name, inst_name))
                    if running is None:
                        running = Held(inst, now)
                        started.append(inst_name)
                    if now - running.since < self.hold:
                        keep[(name, inst_name)] = running
                if started:
                    log.error(
                        "blast-radius guard: holding removals",
                        service=name,
                        removing=len(gone) + len(earlier),
                        of=base,
                        held=len(gone),
                        max_removal_pct=self.max_removal_pct,
                        hold_s=self.hold,
                        revision=snapshot.revision,
                    )
            for inst_name, inst in gone.items():
                key = (name, inst_name)
                if key not in keep and key not in self.held:  # a released hold is final
                    self.removed[key] = Held(inst, now)
        self.held = keep
        return _with_held(snapshot, applied, keep) if keep else snapshot


def _promoted(before: Service, after: Service) -> bool:
    return (before.spec.active_version, before.spec.canary) != (
        after.spec.active_version,
        after.spec.canary,
    )


def _with_held(
    snapshot: Snapshot, applied: Snapshot, held: dict[tuple[str, str], Held]
) -> Snapshot:
    services = dict(snapshot.services)
    layout = snapshot.layout
    for (name, inst_name), h in sorted(held.items()):
        svc = services.get(name)
        if svc is None:
            layout = 0  # a service the catalog no longer has: not the catalog's layout
            kept = applied.services.get(name)
            svc = replace(kept, instances={}) if kept is not None else Service(name)
        instances = dict(svc.instances)
        instances[inst_name] = h.instance
        services[name] = replace(svc, instances=MappingProxyType(dict(sorted(instances.items()))))
    services_ = MappingProxyType(dict(sorted(services.items())))
    return replace(snapshot, services=services_, layout=layout)
