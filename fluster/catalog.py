"""A consistent, always-one-revision view of `{prefix}/services/`: list, then watch.

The catalog is what the reloader renders from and what `fluster ls` prints. It holds
exactly the state of etcd at one revision, never a mix: a watch response is applied
whole before anything sees it. Listing, resuming after a break and listing again after
a compaction are `fluster.follow.Follow`'s; this module says what the records mean.

Records that fail validation are skipped with one log line and a counter; they never
reach a Snapshot and never hide the valid records beside them. An invalid spec is the
exception to "skipped means gone": the service keeps the last good spec it had (log
line, `specs_kept_total`), because falling back to the defaults would silently undo a
promotion and route every version again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import structlog

from fluster import keys
from fluster.follow import Follow
from fluster.records import (
    Instance,
    RecordError,
    ServiceSpec,
    validate_instance_name,
    validate_service_name,
)
from fluster.store import Event, KeyValue, Store, Unavailable, WatchBatch

log = structlog.get_logger("fluster.catalog")


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    spec: ServiceSpec = field(default_factory=ServiceSpec)
    has_spec: bool = False  # False: no (valid) spec in etcd, defaults apply
    instances: Mapping[str, Instance] = field(
        default_factory=dict
    )  # instance name -> Instance, sorted by name
    spec_revision: int = 0  # mod revision of the spec key, for compare-and-swap writes
    # etcd create revisions: who claimed a host or port first (see fluster.routing).
    spec_created: int = 0  # of the spec key; 0 without a spec
    created: Mapping[str, int] = field(default_factory=dict)  # instance name -> revision
    # routed(), made once: a change asks it of its service from the model's build, the
    # removal guard and the status line, each a walk of every instance.
    _routed: Mapping[str, Instance] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def routed(self) -> Mapping[str, Instance]:
        """Instances that should take traffic: `up` and of a version the spec routes."""
        if self._routed is None:
            routed = {
                name: inst
                for name, inst in self.instances.items()
                if inst.state == "up" and self.spec.routes_version(inst.version)
            }
            object.__setattr__(self, "_routed", MappingProxyType(routed))
        assert self._routed is not None
        return self._routed

    def versions(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for inst in self.instances.values():
            counts[inst.version] = counts.get(inst.version, 0) + 1
        return dict(sorted(counts.items()))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The registry at one etcd revision."""

    revision: int = 0
    services: Mapping[str, Service] = field(default_factory=dict)  # sorted by name
    rejected: Mapping[str, str] = field(default_factory=dict)  # key -> why, right now
    # Changes when a service appears or goes or a spec changes, and only then: two
    # snapshots of one layout have the same services and specs (their instances may
    # differ), so what depends on those alone can be kept. 0: unknown, never the same.
    layout: int = 0
    # Which services each snapshot changed, shared by the snapshots of one catalog
    # between two lists: `changed_services` reads it instead of comparing every service.
    seq: int = field(default=0, compare=False)  # 0: not the catalog's own (a guarded copy)
    changes: ChangeLog | None = field(default=None, compare=False, repr=False)

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.services.values())

    def same_layout(self, other: Snapshot | None) -> bool:
        return other is not None and self.layout != 0 and self.layout == other.layout


class ChangeLog:
    """The services each of a catalog's last KEEP snapshots changed (by `seq`). A list
    (first, or after a compaction) starts a new log: no answer spans one."""

    KEEP = 1024

    def __init__(self) -> None:
        self._touched: dict[int, frozenset[str]] = {}

    def record(self, seq: int, touched: frozenset[str]) -> None:
        self._touched[seq] = touched
        self._touched.pop(seq - self.KEEP, None)

    def between(self, before: int, after: int) -> frozenset[str] | None:
        """The services changed after snapshot `before` up to `after`; None when the
        log no longer (or never) held every step."""
        if not 0 < before <= after or after - before >= self.KEEP:
            return None
        if after - before == 1:
            return self._touched.get(after)
        steps = [self._touched.get(seq) for seq in range(before + 1, after + 1)]
        if any(step is None for step in steps):
            return None
        return frozenset().union(*steps)  # type: ignore[arg-type]


def changed_services(before: Snapshot | None, after: Snapshot) -> frozenset[str]:
    """The services added, removed or changed from `before` to `after` (None: nothing
    before). What lets the work that follows a change look at the changed services
    only (issue 15).

    Two of the catalog's own snapshots: what the catalog recorded when it made them,
    whatever the catalog's size. Otherwise (a snapshot the removal guard patched, or
    across a list) an identity test per service, since the catalog keeps an unchanged
    service's object; its last answer is kept, as one apply asks it of the same two
    snapshots from the removal guard, the host facts, the model's build and the status
    line (the profile in docs/BENCHMARKS.md, P10)."""
    if before is None:
        return frozenset(after.services)
    b, a = before.services, after.services
    if before.changes is not None and before.changes is after.changes:
        logged = before.changes.between(before.seq, after.seq)
        if logged is not None:  # less what came and went in between
            return frozenset(name for name in logged if name in a or name in b)
    global _last_changed
    last = _last_changed
    if last is not None and last[0] is b and last[1] is a:
        return last[2]
    changed = {name for name, svc in a.items() if b.get(name) is not svc}
    if len(a) != len(b) or changed:
        changed.update(b.keys() - a.keys())
    answer = frozenset(changed)
    _last_changed = (b, a, answer)
    return answer


# (before, after, answer) of the last walk. Strong references, so an id is never reused
# while it is kept: two snapshots' service maps, which the reloader holds anyway.
_last_changed: tuple[Mapping[str, Service], Mapping[str, Service], frozenset[str]] | None = None


class _Building:
    """Mutable per-service state, frozen into a Service only when it changed."""

    __slots__ = ("created", "in_order", "instances", "spec", "spec_created", "spec_revision")

    def __init__(self) -> None:
        self.spec: ServiceSpec | None = None
        self.spec_revision = 0
        self.spec_created = 0
        self.instances: dict[str, Instance] = {}
        self.created: dict[str, int] = {}
        self.in_order = True  # `instances` is sorted by name (a new name breaks that)

    def put(self, name: str, instance: Instance, created: int) -> None:
        if self.in_order and name not in self.instances and self.instances:
            self.in_order = name > next(reversed(self.instances))
        self.instances[name] = instance  # an existing name keeps its place
        self.created[name] = created

    def freeze(self, name: str) -> Service:
        if not self.in_order:
            self.instances = dict(sorted(self.instances.items()))
            self.in_order = True
        return Service(
            name=name,
            spec=self.spec or ServiceSpec(),
            has_spec=self.spec is not None,
            instances=MappingProxyType(dict(self.instances)),
            spec_revision=self.spec_revision,
            spec_created=self.spec_created,
            created=MappingProxyType(dict(self.created)),
        )


class Catalog:
    """List-then-watch of the services prefix into Snapshots.

    `run(on_change)` runs until cancelled, calling `on_change(snapshot)` after the
    initial list, after each watch response that changed something and after each
    resync. Only Unavailable is retried: AuthError and WatchRefused propagate, since a
    reloader that may not read the registry must stop rather than serve stale routes.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        progress_every: float = 5.0,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.snapshot = Snapshot()
        self.rejected_total = 0
        self.specs_kept_total = 0  # invalid specs answered by keeping the last good one
        self.follow = Follow(
            store,
            keys.services_prefix(prefix),
            progress_every=progress_every,
            clock=clock,
            retried=(Unavailable,),
        )
        self._building: dict[str, _Building] = {}
        self._frozen: dict[str, Service] = {}
        self._rejected: dict[str, str] = {}
        self._last_good: dict[str, ServiceSpec] = {}  # survives a relist, unlike _building
        self._layout = 0  # Snapshot.layout of the last snapshot
        self._seq = 0  # Snapshot.seq of the last snapshot
        self._changes = ChangeLog()

    @property
    def revision(self) -> int:
        return self.snapshot.revision

    @property
    def last_sync(self) -> float | None:
        """clock() when etcd last confirmed the state we hold."""
        return self.follow.last_sync

    @property
    def resyncs(self) -> int:
        return self.follow.resyncs

    @property
    def reconnects(self) -> int:
        return self.follow.reconnects

    def sync_age(self) -> float | None:
        """Seconds since etcd last confirmed the state we hold; None before the first."""
        return self.follow.sync_age()

    # -- loading ------------------------------------------------------------------------

    async def load(self) -> Snapshot:
        """Replace all state with a fresh consistent read of the prefix."""
        revision, kvs = await self.store.get_prefix(self.follow.prefix)
        return self._listed(revision, kvs)

    async def run(self, on_change: Callable[[Snapshot], None]) -> None:
        """Follow the prefix until cancelled (a catalog loaded or run before resumes
        from its revision rather than listing again)."""

        def listed(revision: int, kvs: Sequence[KeyValue]) -> None:
            on_change(self._listed(revision, kvs))

        def changed(batch: WatchBatch) -> None:
            touched = {
                name
                for name in (self._apply(ev, batch.revision) for ev in batch.events)
                if name is not None
            }
            snapshot = self._publish(max(batch.revision, self.revision), touched)
            if touched:
                on_change(snapshot)

        await self.follow.run(listed, changed)

    def _listed(self, revision: int, kvs: Sequence[KeyValue]) -> Snapshot:
        self._building.clear()
        self._frozen.clear()
        self._rejected.clear()
        self._layout += 1  # a new list: nothing kept from before can be trusted
        self._changes = ChangeLog()
        for kv in kvs:
            self._put(kv, revision)
        snapshot = self._publish(revision, set(self._building))
        self.follow.synced(revision)
        return snapshot

    # -- applying records ---------------------------------------------------------------

    def _apply(self, event: Event, revision: int) -> str | None:
        """Apply one event; returns the service it touched, if any."""
        if event.type == "put":
            return self._put(event.kv, revision)
        return self._delete(event.kv.key)

    def _put(self, kv: KeyValue, revision: int) -> str | None:
        parsed = keys.parse_key(self.prefix, kv.key)
        if parsed is None:
            return None  # a key outside the layout (another tool's): not ours to judge
        try:
            validate_service_name(parsed.service)
            if parsed.kind == "spec":
                spec = ServiceSpec.parse(kv.value)
            else:
                validate_instance_name(parsed.instance)
                instance = Instance.parse(kv.value)
        except RecordError as exc:
            good = self._last_good.get(parsed.service) if parsed.kind == "spec" else None
            self._reject(kv, revision, exc, kept=good is not None)
            if good is None:
                # The key now holds something invalid: whatever it held before is gone.
                return self._delete(kv.key, keep_rejection=True)
            # Keep the last good spec, at the key's new revision so that an operator's
            # compare-and-swap edit (`fluster spec`) replaces the invalid record.
            svc = self._building.setdefault(parsed.service, _Building())
            svc.spec, svc.spec_revision = good, kv.mod_revision
            svc.spec_created = kv.create_revision
            return parsed.service
        self._rejected.pop(kv.key, None)
        svc = self._building.setdefault(parsed.service, _Building())
        if parsed.kind == "spec":
            svc.spec, svc.spec_revision = spec, kv.mod_revision
            self._last_good[parsed.service] = spec
            svc.spec_created = kv.create_revision
        else:
            svc.put(parsed.instance, instance, kv.create_revision)
        return parsed.service

    def _delete(self, key: str, *, keep_rejection: bool = False) -> str | None:
        if not keep_rejection:
            self._rejected.pop(key, None)
        parsed = keys.parse_key(self.prefix, key)
        svc = self._building.get(parsed.service) if parsed else None
        if parsed is None or svc is None:
            return None
        if parsed.kind == "spec":
            svc.spec, svc.spec_revision, svc.spec_created = None, 0, 0
            if not keep_rejection:
                self._last_good.pop(parsed.service, None)  # deleted on purpose: defaults
        else:
            svc.instances.pop(parsed.instance, None)
            svc.created.pop(parsed.instance, None)
        if svc.spec is None and not svc.instances:
            del self._building[parsed.service]
        return parsed.service

    def _reject(self, kv: KeyValue, revision: int, exc: RecordError, *, kept: bool) -> None:
        self.rejected_total += 1
        self.specs_kept_total += kept
        self._rejected[kv.key] = str(exc) + ("; the last good spec is kept" if kept else "")
        log.warning(
            "invalid spec, keeping the last good one" if kept else "invalid record skipped",
            key=kv.key[:300],
            field=exc.field,
            reason=exc.reason[:300],
            revision=revision,
        )

    def _publish(self, revision: int, touched: set[str]) -> Snapshot:
        # _frozen stays sorted by name: replacing or removing a service keeps the order,
        # so only a new service costs a sort (a membership change costs a copy).
        added = relaid = False
        for name in touched:
            building = self._building.get(name)
            old = self._frozen.get(name)
            if building is None:
                self._frozen.pop(name, None)
                relaid = relaid or old is not None
            else:
                added = added or old is None
                new = self._frozen[name] = building.freeze(name)
                relaid = relaid or old is None or _spec_of(old) != _spec_of(new)
        if added:
            self._frozen = dict(sorted(self._frozen.items()))
        if relaid or not self._layout:
            self._layout += 1
        self._seq += 1
        self._changes.record(self._seq, frozenset(touched))
        self.snapshot = Snapshot(
            revision=revision,
            services=MappingProxyType(dict(self._frozen)),
            rejected=MappingProxyType(dict(self._rejected)),
            layout=self._layout,
            seq=self._seq,
            changes=self._changes,
        )
        return self.snapshot


def _spec_of(svc: Service) -> tuple[object, ...]:
    return (svc.spec, svc.has_spec, svc.spec_revision, svc.spec_created)
