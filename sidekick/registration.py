"""The registration core: one instance record in etcd, under its own lease.

Every mode (companion, host agent, static) ends up here. A `Registration` is told what
the world looks like (healthy? retired? shutting down? key deleted by someone?) and one
task, `run`, makes etcd match it, so writes for a key never race each other:

- wanted (healthy, not retired, not closing): put the record under our `Lease`
  (fluster/lease.py grants it and keeps it alive over ONE stream, every TTL/3, with no
  other request: the cost of a sidekick is that stream and nothing else);
- not wanted: put `state: draining`, wait the drain period (cut short when the
  container has already died), revoke the lease.

Failures are retried forever with the store's one retry policy (<= 1 s, so a record is
back within a second of etcd being reachable). A lost lease (expired in a partition,
revoked) or a key deleted behind our back (the watch in `hub.py` tells us) means: grant
again, put again; after a lost lease, once the lease's random hold-off is over
(`reregister_spread`, fluster/lease.py says why). Nothing here ever touches the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from fluster.lease import Lease, hex_id
from fluster.records import Instance, RecordError, ServiceSpec
from fluster.runtime import Supervisor
from fluster.store import LeaseLost, Store, StoreError, retry_backoff, retry_cap

log = structlog.get_logger("sidekick.registration")


class Registration:
    """Keeps `instance` under `key` while it is wanted; see the module docstring."""

    def __init__(
        self,
        store: Store,
        key: str,
        instance: Instance,
        *,
        service: str,
        name: str,
        ttl: int,
        drain_seconds: float,
        reregister_spread: float | None = None,
        healthy: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.store, self.key, self.instance = store, key, instance
        self.service, self.name = service, name
        self.ttl, self.drain_seconds = ttl, drain_seconds
        self.healthy = healthy
        self.retired = False
        self.closing = False
        self.spec_seen = asyncio.Event()  # no put before we know whether we are retired
        self.idle = asyncio.Event()  # set while nothing of ours is in etcd
        self.idle.set()
        self.on_retired: Callable[[], None] | None = None  # once, after deregistering
        self.log = log.bind(service=service, instance=name)
        self._clock = clock
        self._was_routed = False
        self._spec: ServiceSpec | None = None
        self._fallback: str | None = None  # the version the edge falls back to, if any
        self._held = False  # retirement held because the edge falls back to our version
        self._retire_timer: asyncio.TimerHandle | None = None
        self._wall = wall
        self._lease = Lease(
            store,
            ttl,
            name=key,
            on_lost=self._lease_lost,
            spread=reregister_spread,
            clock=clock,
            jitter=jitter,
        )
        self._written: Instance | None = None
        self._put_revision = 0
        self._wake = asyncio.Event()
        self._cut_drain = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._holdoff_timer: asyncio.TimerHandle | None = None

    # -- what the world says ------------------------------------------------------------

    @property
    def wanted(self) -> bool:
        return self.healthy and not self.retired and not self.closing

    @property
    def lease(self) -> int | None:
        return self._lease.id

    @property
    def holdoff(self) -> float:
        """Seconds before a lost lease is granted again (0: not holding off)."""
        return self._lease.holdoff()

    @property
    def put_revision(self) -> int:
        return self._put_revision

    @property
    def held(self) -> bool:
        """Superseded, but kept: the edge falls back to our version (see observe_spec)."""
        return self._held

    @property
    def written(self) -> bool:
        return self._written is not None

    @property
    def current(self) -> bool:
        """True unless the record should be in etcd and is not known to be (for --check)."""
        if not self.wanted:
            return True
        refreshed = self._lease.refreshed
        fresh = refreshed is not None and self._clock() - refreshed < self.ttl
        return self._written == self.instance and fresh

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.log.info("app healthy" if healthy else "app unhealthy: deregistering")
        self.healthy = healthy
        self._poke()

    def key_deleted(self, revision: int) -> None:
        """Our key was deleted at `revision` (watch or resync): put it back if wanted."""
        if self._written is not None and revision > self._put_revision and not self.wanted:
            self._written = None  # on its way out anyway (our own revoke, most likely)
        elif self._written is not None and revision > self._put_revision:
            self.log.warning("record deleted from etcd, registering again", revision=revision)
            self._written = None
            self._poke()

    def observe_spec(self, spec: ServiceSpec, *, fallback: str | None = None) -> None:
        """Retire when a promotion moved traffic away from a version we once served.

        A version that was never routed (a new release started before its promotion)
        must register, or it could never be promoted; one listed in the spec's history
        was superseded while we were not looking, so it stays retired.

        `fallback` is the version the edge serves because the active one has no
        instance up (`fluster.routing.routing`, decided by the hub): retiring it would
        route the service to nothing, so its retirement waits until the hub says the
        active version has instances again (it calls us then with another fallback).
        """
        self._spec, self._fallback = spec, fallback
        if self._retire_timer is not None:
            self._retire_timer.cancel()
            self._retire_timer = None
        version = self.instance.version
        self._held = self._held and version == fallback
        if spec.routes_version(version):
            self._was_routed = True
        elif self.retired or not (self._was_routed or (version and version in spec.history)):
            pass  # retired stays so; a version never routed registers to be promoted
        elif version and version == fallback:
            if not self._held:
                self.log.info(
                    "retirement held: the edge falls back to this version",
                    version=version,
                    active_version=spec.active_version,
                )
            self._held = True
        else:
            # `fluster promote --keep-old D` keeps old records for D so that a rollback
            # finds instances to roll back to; they retire when that time is up.
            wait = _seconds_until(spec.keep_old_until, self._wall())
            if wait > 0:
                self.log.info(
                    "superseded, kept for a rollback", version=version, until=spec.keep_old_until
                )
                loop = asyncio.get_running_loop()
                self._retire_timer = loop.call_later(wait, self._recheck)
            else:
                self.log.info(
                    "retired: traffic moved to another version",
                    version=version,
                    active_version=spec.active_version,
                )
                self.retired = True
        self.spec_seen.set()
        self._poke()

    def _recheck(self) -> None:
        self._retire_timer = None
        if self._spec is not None:
            self.observe_spec(self._spec, fallback=self._fallback)

    def foreign_put(self, raw: bytes, revision: int) -> None:
        """Someone else wrote our key. `fluster drain` marks it draining: keep it so,
        including after a re-registration, instead of silently undoing the operator."""
        # Not while we drain: our own draining put may be seen before put() returns.
        if revision <= self._put_revision or self._written is None or not self.wanted:
            return
        with contextlib.suppress(RecordError):
            record = Instance.parse(raw)
            if record.state == "draining" and self.instance.state != "draining":
                self.log.info("drained by an operator; staying draining")
                self.instance = self.instance.replace(state="draining")
                self._written = self.instance
                self._put_revision = revision

    def container_died(self) -> None:
        """Nothing left to drain: deregister without waiting the drain period."""
        self._cut_drain.set()
        self._poke()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, supervisor: Supervisor) -> None:
        """Run the writer under `supervisor`: if it ever dies, the process stops."""
        self._task = supervisor.start(f"register {self.key}", self.run())
        self._poke()

    async def close(self, *, limit: float | None = None) -> None:
        """Drain and deregister, then stop; bounded by `limit` (default drain + 5 s)."""
        self.closing = True
        self._poke()
        limit = limit if limit is not None else self.drain_seconds + 5.0
        try:
            async with asyncio.timeout(limit):
                await self.idle.wait()
        except TimeoutError:
            self.log.warning(
                "could not deregister in time; the record expires with its lease",
                lease=hex_id(self._lease.id),
                ttl=self.ttl,
            )
        await self.cancel()

    async def cancel(self) -> None:
        """Stop writing and refreshing without touching etcd (the lease then expires)."""
        for timer in (self._retire_timer, self._holdoff_timer):
            if timer is not None:
                timer.cancel()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._lease.close()

    def _poke(self) -> None:
        self._wake.set()

    # -- the one writer -----------------------------------------------------------------

    async def run(self) -> None:
        backoff = retry_backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                if self.wanted and self.spec_seen.is_set():
                    if wait := self.holdoff:
                        # Not a sleep: what is wanted may change meanwhile.
                        if self._holdoff_timer is not None:
                            self._holdoff_timer.cancel()
                        self._holdoff_timer = asyncio.get_running_loop().call_later(
                            wait, self._poke
                        )
                    else:
                        await self._up()
                elif not self.wanted and (self._written or self._lease.id):
                    await self._down()
                backoff.reset()
            except LeaseLost:
                pass  # the lease forgot itself and told `_lease_lost`: we put again
            except StoreError as exc:
                self.log.warning(
                    "etcd write failed, retrying",
                    error=str(exc),
                    attempt=backoff.attempt + 1,
                    lease=hex_id(self._lease.id),
                )
                self._poke()
                await backoff.sleep(cap=retry_cap(exc))
            if not self._written and not self._lease.id:
                self.idle.set()
                if self.retired and self.on_retired is not None:
                    callback, self.on_retired = self.on_retired, None
                    callback()

    async def _up(self) -> None:
        self.idle.clear()
        await self._lease.ensure()
        if self._written != self.instance:
            self._put_revision = await self._lease.put(self.key, self.instance.to_json())
            self._written = self.instance
            self.log.info(
                "registered",
                address=self.instance.address,
                lease=hex_id(self._lease.id),
                version=self.instance.version,
                ttl=self.ttl,
            )

    async def _down(self) -> None:
        """Draining record, drain period, revoke: resumable after an etcd error."""
        lease = self._lease.id
        fresh = self._written is not None and self._written.state != "draining"
        if fresh and lease and self.drain_seconds > 0 and not self._cut_drain.is_set():
            draining = self.instance.replace(state="draining")
            self._put_revision = await self._lease.put(self.key, draining.to_json())
            self._written = draining
            self.log.info("draining", seconds=self.drain_seconds, lease=hex_id(lease))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cut_drain.wait(), self.drain_seconds)
        if lease is not None:
            await self._lease.revoke()  # takes the key with it
        elif self._written is not None:
            await self.store.delete(self.key)
        self.log.info("deregistered", lease=hex_id(lease))
        self._written = None
        self._cut_drain.clear()

    def _lease_lost(self) -> None:
        """The lease expired (a partition) or was revoked behind our back: put again,
        once the lease's hold-off is over."""
        self.log.warning("lease expired, registering again", after_seconds=round(self.holdoff, 2))
        self._written = None
        self._poke()


def _seconds_until(when: str | None, now: datetime) -> float:
    if not when:
        return 0.0
    try:
        return (datetime.fromisoformat(when) - now).total_seconds()
    except (ValueError, TypeError):  # validated by ServiceSpec; a naive time slips past
        return 0.0
