"""A lease kept alive: the one place fluster grants, refreshes, re-grants and revokes.

A key bound to a lease vanishes when its holder stops refreshing: a dead sidekick's
instance record, a dead reloader's status key, a dead deployer's lock all go within
one TTL, with nobody cleaning up. That promise rests on a protocol that is easy to get
subtly wrong, so it is written here once:

- grant with the TTL; refresh over ONE keepalive stream every TTL/3 and send nothing
  else (the steady-state cost of a holder is that stream);
- a broken stream is reopened with backoff: the lease itself lives on for its TTL;
- a lease that etcd calls gone (expired during a partition, revoked by an operator) is
  *lost*, and its keys went with it: the holder is told (`on_lost`), and a holder run
  by `run()` / `async with` grants a new lease and writes its keys again, after a random
  delay of up to `spread` seconds (default TTL/3, `holdoff()`): when etcd loses every
  lease at once (restored from a snapshot), a fleet's re-grants (and the writes after
  them) are spread over TTL/3 as its keepalives are, not sent in the same second;
- every etcd error is retried with the one policy (`store.retry_backoff`): at most
  RETRY_CAP (1 s) between attempts, AUTH_RETRY_CAP (10 s) after an AuthError, which
  will not fix itself quickly but must not kill a daemon either.

Two ways to hold one:

A writer with a loop of its own (the sidekick's `Registration`, which drains before it
revokes) calls `ensure()` before it writes, `put()` to write, `revoke()` when done, and
reacts to `on_lost` by writing again.

Everyone else lets the lease do it. `set(key, value)` says what a key should hold and
`run()` (forever) or `async with lease:` (a background task, revoked on exit) writes
it, and writes it again after a loss. The reloader's status key is `set()` after each
apply. A lock is a key put only if absent under the lease:

    async with Lease(store, ttl=10, name="deploy lock") as lease:
        try:
            await lease.put_if_absent(keys.app_lock_key(prefix, app), holder)
        except Conflict:
            ...  # someone else holds it; their lease keeps it, their death frees it
        ...      # work; lease.holds(key) turns False if the lock was lost
    # on exit the lease is revoked, so the key goes at once, not after a TTL

After a loss, a key taken with `put_if_absent` is taken again only if it is still absent;
if another holder got it meanwhile, it is dropped from this lease (`holds()` turns False).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from fluster.store import Conflict, LeaseLost, Store, StoreError, retry_backoff, retry_cap

log = structlog.get_logger("fluster.lease")

REVOKE_TIMEOUT = 2.0  # seconds to revoke at exit; after that the keys wait out the TTL


@dataclass(slots=True)
class _Wanted:
    value: bytes
    only_if_absent: bool
    written_under: int = 0  # the lease id it was last written with; 0: not yet


class Lease:
    """One etcd lease of `ttl` seconds and the keys bound to it; see the module docstring."""

    def __init__(
        self,
        store: Store,
        ttl: int,
        *,
        name: str,
        on_lost: Callable[[], None] | None = None,
        spread: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.store, self.ttl, self.name = store, ttl, name
        self.on_lost = on_lost  # called when etcd says the lease is gone (keys gone too)
        self.spread = ttl / 3 if spread is None else spread  # seconds, see holdoff()
        self.clock, self._jitter = clock, jitter
        # time.monotonic() before which a lost lease is not granted again: real time,
        # whatever `clock` is, since the waits on it are real.
        self._regrant_at = 0.0
        self.refreshed: float | None = None  # clock() when etcd last confirmed the lease
        self.losses = 0
        self.errors = 0  # etcd errors `run()` retried (a grant or a write refused)
        self.log = log.bind(lease_of=name)
        self._id: int | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._wanted: dict[str, _Wanted] = {}
        self._unwanted: set[str] = set()  # keys `unset()` whose delete is still to come
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    @property
    def id(self) -> int | None:
        """The current lease id, None while there is none (not granted yet, lost, revoked)."""
        return self._id

    def holdoff(self) -> float:
        """Seconds to wait before granting again after a loss (a random share of
        `spread`, drawn at the loss); 0 when nothing was lost or the wait is over."""
        return max(0.0, self._regrant_at - time.monotonic())

    def holds(self, key: str) -> bool:
        """Whether `key` is bound to this lease (written, or to be written again)."""
        return key in self._wanted

    # -- the protocol -------------------------------------------------------------------

    async def ensure(self) -> int:
        """The lease id, granting a lease first if there is none; keeps it alive."""
        if self._id is None:
            self._id = await self.store.grant(self.ttl)
            self.refreshed = self.clock()
            self.log.debug("lease granted", lease=hex_id(self._id), ttl=self.ttl)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep(self._id), name=f"keepalive {self.name}")
            self._keeper.add_done_callback(self._keeper_ended)
        return self._id

    def _keeper_ended(self, task: asyncio.Task[None]) -> None:
        # It returns after a loss and retries every StoreError: anything else is a bug,
        # said loudly; the next `ensure()` starts a new one.
        if not task.cancelled() and task.exception() is not None:
            self.log.error("lease keepalive task failed", error=repr(task.exception()))

    async def put(self, key: str, value: str | bytes) -> int:
        """Write `key` under the lease (granting one if needed); returns the revision.

        Raises LeaseLost (and forgets the lease) when etcd no longer knows it.
        """
        lease = await self.ensure()
        try:
            revision = await self.store.put(key, value, lease=lease)
        except LeaseLost:
            self._lost(lease)
            raise
        self.refreshed = self.clock()  # etcd refuses a put with an unknown lease
        return revision

    async def put_if_absent(self, key: str, value: str | bytes) -> int:
        """Take `key` under the lease unless it exists; raises Conflict if it does.

        The key stays bound: after a loss it is taken again if it is still absent.
        """
        data = value.encode() if isinstance(value, str) else value
        lease = await self.ensure()
        try:
            revision = await self.store.replace(key, data, mod_revision=0, lease=lease)
        except LeaseLost:
            self._lost(lease)
            raise
        self._wanted[key] = _Wanted(data, only_if_absent=True, written_under=lease)
        self.refreshed = self.clock()
        self._wake.set()  # a running `run()` must learn of the key
        return revision

    def set(self, key: str, value: str | bytes) -> None:
        """Say that `key` should hold `value` under the lease; `run()` writes it."""
        data = value.encode() if isinstance(value, str) else value
        self._wanted[key] = _Wanted(data, only_if_absent=False)
        self._wake.set()

    def unset(self, key: str) -> None:
        """Say that `key` should go (deleted by `run()`; with the lease anyway)."""
        if self._wanted.pop(key, None) is not None:
            self._unwanted.add(key)
            self._wake.set()

    async def revoke(self) -> None:
        """Revoke the lease (its keys go with it) and forget every key; retryable."""
        await self._stop_keeper()
        if self._id is not None:
            await self.store.revoke(self._id)
            self.log.debug("lease revoked", lease=hex_id(self._id))
        self._id = None
        self._wanted.clear()

    async def close(self) -> None:
        """Stop refreshing without revoking: the keys expire with the lease (one TTL)."""
        await self._stop_keeper()
        self._id = None

    def _lost(self, lease: int) -> None:
        if self._id != lease:
            return  # an old lease: already replaced or revoked
        self.losses += 1
        self._id = None
        self._regrant_at = time.monotonic() + self._jitter(0.0, self.spread)
        if self._keeper is not asyncio.current_task() and self._keeper is not None:
            self._keeper.cancel()
        self._keeper = None
        self._wake.set()
        if self.on_lost is not None:
            self.on_lost()
        else:
            self.log.warning("lease lost with its keys, granting again", lease=hex_id(lease))

    async def _stop_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep(self, lease: int) -> None:
        """Refresh `lease` over one stream; reopen it after errors, report a lost lease."""
        backoff = retry_backoff()
        while True:
            try:
                async for _ttl in self.store.keepalive(lease, self.ttl / 3):
                    self.refreshed = self.clock()
                    backoff.reset()
            except LeaseLost:
                self._lost(lease)
                return
            except StoreError as exc:
                self.log.warning(
                    "lease keepalive failed, retrying",
                    error=str(exc),
                    attempt=backoff.attempt + 1,
                    lease=hex_id(lease),
                )
                await backoff.sleep(cap=retry_cap(exc))

    # -- holding it for the caller ------------------------------------------------------

    async def run(self) -> None:
        """Hold the lease until cancelled: grant, write what was `set()`, keep it alive;
        after a loss grant again and write again. Never returns; errors are retried."""
        backoff = retry_backoff()
        while True:
            self._wake.clear()
            try:
                if wait := self.holdoff():
                    await asyncio.sleep(wait)
                lease = await self.ensure()
                await self._write(lease)
                backoff.reset()
                await self._wake.wait()
            except LeaseLost:
                pass  # `_lost` forgot the lease and said so: grant again at once
            except StoreError as exc:
                self.errors += 1
                self.log.warning(
                    "lease or its keys not written, retrying",
                    error=str(exc),
                    attempt=backoff.attempt + 1,
                    lease=hex_id(self._id),
                )
                await backoff.sleep(cap=retry_cap(exc))

    async def _write(self, lease: int) -> None:
        for key in list(self._unwanted):
            if key not in self._wanted:
                await self.store.delete(key)
            self._unwanted.discard(key)
        for key, wanted in list(self._wanted.items()):
            if wanted.written_under == lease or self._wanted.get(key) is not wanted:
                continue
            if not wanted.only_if_absent:
                await self.put(key, wanted.value)
            else:
                try:
                    await self.store.replace(key, wanted.value, mod_revision=0, lease=lease)
                except Conflict:
                    self.log.warning("key taken by another holder while ours was lost", key=key)
                    del self._wanted[key]
                    continue
                except LeaseLost:
                    self._lost(lease)
                    raise
            wanted.written_under = lease

    async def __aenter__(self) -> Lease:
        await self.ensure()
        self._runner = asyncio.create_task(self.run(), name=f"lease {self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        await self.release()

    async def release(self) -> None:
        """Revoke within REVOKE_TIMEOUT (at shutdown); failing that, stop refreshing, so
        the keys go one TTL later."""
        try:
            async with asyncio.timeout(REVOKE_TIMEOUT):
                await self.revoke()
        except (StoreError, TimeoutError) as error:
            self.log.warning(
                "lease not revoked; its keys expire with it", error=repr(error), ttl=self.ttl
            )
            await self.close()


def hex_id(lease: int | None) -> str | None:
    """A lease id as etcdctl prints it."""
    return None if lease is None else f"{lease:x}"
