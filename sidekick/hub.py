"""One etcd watch per service, shared by every registration of that service.

A sidekick must notice two things it did not do itself: its record deleted (`etcdctl
del`, `fluster gc`) and its service's spec changed (a promotion that retires its
version). Both live under `{prefix}/services/{service}/`, so one watch of that prefix
answers both for any number of local instances of the service, and costs no request
while nothing changes: progress requests are rare (`PROGRESS_EVERY`), since a frozen
member is already detected by the channel's HTTP/2 keepalive pings.

List, watch, resume and relist are `fluster.follow.Follow`'s, so no delete is ever
missed; this module says what a listed or changed key means to the registrations.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import structlog

from fluster.follow import Follow
from fluster.keys import service_prefix, spec_key
from fluster.records import RecordError, ServiceSpec
from fluster.runtime import Supervisor
from fluster.store import Event, KeyValue, Store, WatchBatch
from sidekick.registration import Registration

log = structlog.get_logger("sidekick.hub")

PROGRESS_EVERY = 120.0


class ServiceWatch:
    """Watches one service's keys and tells its registrations what changed."""

    def __init__(self, store: Store, prefix: str, service: str) -> None:
        self.store, self.service = store, service
        self.prefix = service_prefix(prefix, service)
        self.spec_key = spec_key(prefix, service)
        self.spec: ServiceSpec | None = None
        self.registrations: dict[str, Registration] = {}
        self.log = log.bind(service=service)
        self.task: asyncio.Task[None] | None = None
        self.follow = Follow(store, self.prefix, progress_every=PROGRESS_EVERY)

    def add(self, reg: Registration) -> None:
        self.registrations[reg.key] = reg
        if self.spec is not None:
            reg.observe_spec(self.spec)

    async def run(self) -> None:
        """Follow the service's keys until cancelled; every error is retried."""
        await self.follow.run(self._listed, self._changed)

    def _listed(self, revision: int, kvs: Sequence[KeyValue]) -> None:
        present = {kv.key for kv in kvs}
        spec = ServiceSpec()
        for kv in kvs:
            if kv.key == self.spec_key:
                spec = self._parse_spec(kv.value) or self.spec or ServiceSpec()
        self._set_spec(spec)
        for reg in self.registrations.values():
            if reg.key not in present and reg.put_revision <= revision:
                reg.key_deleted(revision)

    def _changed(self, batch: WatchBatch) -> None:
        for event in batch.events:
            self._apply(event)

    def _apply(self, event: Event) -> None:
        if event.kv.key == self.spec_key:
            if event.type == "delete":
                self._set_spec(ServiceSpec())
            elif (spec := self._parse_spec(event.kv.value)) is not None:
                self._set_spec(spec)
            return
        reg = self.registrations.get(event.kv.key)
        if reg is not None and event.type == "delete":
            reg.key_deleted(event.kv.mod_revision)
        elif reg is not None:
            reg.foreign_put(event.kv.value, event.kv.mod_revision)

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
        for reg in list(self.registrations.values()):
            reg.observe_spec(spec)


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
