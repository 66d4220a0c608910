"""One etcd watch per service, shared by every registration of that service.

A sidekick must notice two things it did not do itself: its record deleted (`etcdctl
del`, `fluster gc`) and its service's spec changed (a promotion that retires its
version). Both live under `{prefix}/services/{service}/`, so one watch of that prefix
answers both for any number of local instances of the service, and costs no request
while nothing changes: progress requests are rare (`PROGRESS_EVERY`), since a frozen
member is already detected by the channel's HTTP/2 keepalive pings.

The watch also keeps the service's other instance records, because retiring is not
only the spec's business: while the active version has no instance up, the edge serves
a fallback version (`fluster.routing.routing`, the one policy, computed here from the
same records the reloader sees), and the registrations of that version must not retire
and leave the service routed to nothing. They are told the fallback with the spec.

List, watch, resume and relist are `fluster.follow.Follow`'s, so no delete is ever
missed; this module says what a listed or changed key means to the registrations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from fluster.catalog import Service
from fluster.follow import Follow
from fluster.keys import parse_key, service_prefix, spec_key
from fluster.records import Instance, RecordError, ServiceSpec, validate_instance_name
from fluster.routing import routing
from fluster.runtime import Supervisor
from fluster.store import Event, KeyValue, Store, WatchBatch
from sidekick.registration import Registration

log = structlog.get_logger("sidekick.hub")

PROGRESS_EVERY = 120.0


class ServiceWatch:
    """Watches one service's keys and tells its registrations what changed."""

    def __init__(self, store: Store, prefix: str, service: str) -> None:
        self.store, self.service, self.root = store, service, prefix
        self.prefix = service_prefix(prefix, service)
        self.spec_key = spec_key(prefix, service)
        self.spec: ServiceSpec | None = None
        # The service's valid instance records (name -> record, create revision).
        self.instances: dict[str, Instance] = {}
        self.created: dict[str, int] = {}
        self.fallback: str | None = None  # the version the edge falls back to, if any
        self.registrations: dict[str, Registration] = {}
        self.log = log.bind(service=service)
        self.task: asyncio.Task[None] | None = None
        self.follow = Follow(store, self.prefix, progress_every=PROGRESS_EVERY)

    def add(self, reg: Registration) -> None:
        self.registrations[reg.key] = reg
        if self.spec is not None:
            reg.observe_spec(self.spec, fallback=self.fallback)

    async def run(self) -> None:
        """Follow the service's keys until cancelled; every error is retried."""
        await self.follow.run(self._listed, self._changed)

    def _listed(self, revision: int, kvs: Sequence[KeyValue]) -> None:
        present = {kv.key for kv in kvs}
        spec = ServiceSpec()
        self.instances.clear()
        self.created.clear()
        for kv in kvs:
            if kv.key == self.spec_key:
                spec = self._parse_spec(kv.value) or self.spec or ServiceSpec()
            else:
                self._put_instance(kv)
        self._set_spec(spec)
        self._notify()
        for reg in self.registrations.values():
            if reg.key not in present and reg.put_revision <= revision:
                reg.key_deleted(revision)

    def _changed(self, batch: WatchBatch) -> None:
        # The whole batch first: the routing decision is taken on one revision's state.
        fallback = self.fallback
        spec_events = [self._apply(event) for event in batch.events]
        if any(spec_events) or self._routing() != fallback:
            self._notify()

    def _apply(self, event: Event) -> bool:
        """Apply one event; True when it was the spec's."""
        if event.kv.key == self.spec_key:
            if event.type == "delete":
                self._set_spec(ServiceSpec())
            elif (spec := self._parse_spec(event.kv.value)) is not None:
                self._set_spec(spec)
            return True
        if event.type == "delete":
            self._drop_instance(event.kv.key)
        else:
            self._put_instance(event.kv)
        reg = self.registrations.get(event.kv.key)
        if reg is not None and event.type == "delete":
            reg.key_deleted(event.kv.mod_revision)
        elif reg is not None:
            reg.foreign_put(event.kv.value, event.kv.mod_revision)
        return False

    def _put_instance(self, kv: KeyValue) -> None:
        """Keep a valid instance record; an invalid one is skipped (the reloader, which
        skips it too, reports it): whatever the key held before is gone."""
        parsed = parse_key(self.root, kv.key)
        if parsed is None or parsed.kind != "instance" or parsed.service != self.service:
            return
        try:
            validate_instance_name(parsed.instance)
            instance = Instance.parse(kv.value)
        except RecordError:
            self._drop_instance(kv.key)
            return
        self.instances[parsed.instance] = instance
        self.created[parsed.instance] = kv.create_revision

    def _drop_instance(self, key: str) -> None:
        parsed = parse_key(self.root, key)
        if parsed is not None and parsed.kind == "instance":
            self.instances.pop(parsed.instance, None)
            self.created.pop(parsed.instance, None)

    def _routing(self) -> str | None:
        """The version the edge falls back to now, by the reloader's own policy."""
        if self.spec is None:
            return None
        svc = Service(
            name=self.service,
            spec=self.spec,
            has_spec=True,
            instances=dict(sorted(self.instances.items())),
            created=dict(self.created),
        )
        return routing(svc).fallback

    def _parse_spec(self, raw: bytes) -> ServiceSpec | None:
        try:
            return ServiceSpec.parse(raw)
        except RecordError as exc:
            # Keep the last good spec: a typo must not retire (or revive) anything.
            self.log.error("invalid service spec ignored", error=str(exc))
            return None

    def _set_spec(self, spec: ServiceSpec) -> None:
        if spec != self.spec:
            self.log.info(
                "service spec",
                active_version=spec.active_version,
                canary_version=spec.canary.version if spec.canary else None,
            )
        self.spec = spec

    def _notify(self) -> None:
        """Tell every registration the spec and the fallback version."""
        self.fallback = self._routing()
        if self.spec is None:
            return
        for reg in list(self.registrations.values()):
            reg.observe_spec(self.spec, fallback=self.fallback)


class Hub:
    """The service watches of one sidekick process; a watch lives while it has users."""

    def __init__(self, store: Store, prefix: str, supervisor: Supervisor) -> None:
        self.store, self.prefix = store, prefix
        self.supervisor = supervisor  # a watch task that ends stops the process
        self.watches: dict[str, ServiceWatch] = {}

    def add(self, reg: Registration) -> None:
        watch = self.watches.get(reg.service)
        if watch is None:
            watch = self.watches[reg.service] = ServiceWatch(self.store, self.prefix, reg.service)
            watch.task = self.supervisor.start(f"watch {watch.prefix}", watch.run())
        watch.add(reg)

    async def remove(self, reg: Registration) -> None:
        watch = self.watches.get(reg.service)
        if watch is None or watch.registrations.get(reg.key) is not reg:
            return
        del watch.registrations[reg.key]
        if not watch.registrations:
            del self.watches[reg.service]
            if watch.task is not None:
                await self.supervisor.cancel(watch.task)

    async def close(self) -> None:
        watches, self.watches = list(self.watches.values()), {}
        await self.supervisor.cancel(*(w.task for w in watches if w.task is not None))
