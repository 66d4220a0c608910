"""The blast-radius guard: do not let one apply empty a backend by accident.

When leases expire en masse (an etcd partition, a sidekick fleet restart, a stray
`etcdctl del --prefix`), the registry briefly says most instances are gone while the
containers are still serving. Removing them all from HAProxy turns an etcd hiccup into
an outage. So when one apply would remove more than `max_removal_pct` percent of a
service's routed instances, those removals are held (the instances stay in HAProxy)
for `hold` seconds, loudly logged. Instances that come back end their hold.

Not guarded, because they are someone's deliberate decision:
- removals from a changed `active_version`/`canary` (an operator promotion or rollback);
- instances that still exist but turned `draining` (the sidekick is retiring them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType

import structlog

from fluster.catalog import Service, Snapshot
from fluster.records import Instance

log = structlog.get_logger("reloader.guard")


@dataclass(frozen=True, slots=True)
class Held:
    instance: Instance
    since: float


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

    def next_release(self) -> float | None:
        """Clock time of the earliest hold expiry, so the caller can apply again then."""
        return min((h.since + self.hold for h in self.held.values()), default=None)

    def filter(self, snapshot: Snapshot, applied: Snapshot | None) -> Snapshot:
        """`snapshot` with guarded removals put back, relative to the last `applied` one."""
        if not self.enabled or applied is None:
            self.held.clear()
            return snapshot
        now = self.clock()
        keep: dict[tuple[str, str], Held] = {}
        for name, before in applied.services.items():
            after = snapshot.services.get(name)
            if after is not None and _promoted(before, after):
                continue
            previous = before.routed()
            present = after.instances if after is not None else {}
            gone = {i: inst for i, inst in previous.items() if i not in present}
            if not previous or 100.0 * len(gone) / len(previous) <= self.max_removal_pct:
                # Below the threshold now (some came back): running holds still run out.
                for key, held in self.held.items():
                    if key[0] == name and key[1] in gone and now - held.since < self.hold:
                        keep[key] = held
                continue
            for inst_name, inst in gone.items():
                key = (name, inst_name)
                held = self.held.get(key) or Held(inst, now)
                if now - held.since < self.hold:
                    keep[key] = held
            if any(key[0] == name for key in keep):
                log.error(
                    "blast-radius guard: holding removals",
                    service=name,
                    removing=len(gone),
                    of=len(previous),
                    max_removal_pct=self.max_removal_pct,
                    hold_s=self.hold,
                    revision=snapshot.revision,
                )
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
    for (name, inst_name), h in sorted(held.items()):
        svc = services.get(name) or replace(applied.services[name], instances={})
        instances = dict(svc.instances)
        instances[inst_name] = h.instance
        services[name] = replace(svc, instances=MappingProxyType(dict(sorted(instances.items()))))
    return replace(snapshot, services=MappingProxyType(dict(sorted(services.items()))))
