"""List, then watch: the one way fluster follows a prefix of etcd.

The reloader's catalog and the sidekick's per-service watches both hold a copy of
some keys that must equal etcd's at one revision, never miss a delete and never apply
an event twice. The rules that make that true are few but each is easy to get wrong,
so they live here once:

- list the prefix (one consistent read at revision R), then watch from R + 1;
- after a break (member down, no leader, frozen member, token expired) watch again
  from the last revision *applied* + 1: nothing missed, nothing twice;
- when etcd has compacted that history, list again: skipping ahead would silently
  lose the deletes in between;
- a progress notification (a response with no events) proves the stream alive and
  refreshes the sync age, but never advances the revision: etcd 3.4 can send one
  ahead of events still queued for this watcher (etcd-io/etcd#15220), and claiming its
  revision would make a resume skip them.

The owner supplies what a list and a batch of events mean (`run(on_list, on_events)`);
this module owns the revision, the retries (the store's one policy) and the counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import structlog

from fluster.store import (
    Compacted,
    KeyValue,
    Store,
    StoreError,
    Unavailable,
    WatchBatch,
    retry_backoff,
    retry_cap,
)

log = structlog.get_logger("fluster.follow")
T = TypeVar("T")


class Follow:
    """Follows every key under `prefix`; see the module docstring.

    `retried` names the errors `run` retries; any other ends it (the reloader's catalog
    retries only Unavailable: a reloader that may not read the registry stops loudly
    rather than serve as if it could; a sidekick retries everything, slowly for auth).
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        *,
        progress_every: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        retried: tuple[type[StoreError], ...] = (StoreError,),
    ) -> None:
        self.store, self.prefix = store, prefix
        self.progress_every = progress_every
        self.clock = clock
        self.retried = retried
        self.revision = 0  # every event up to here is applied; 0: list first
        self.last_sync: float | None = None  # clock() when etcd last confirmed our state
        self.resyncs = 0  # lists after a compaction
        self.reconnects = 0  # watches resumed after a break
        self.log = log.bind(watch=prefix)

    def sync_age(self) -> float | None:
        """Seconds since etcd last confirmed the state we hold; None before the first."""
        return None if self.last_sync is None else self.clock() - self.last_sync

    def synced(self, revision: int) -> None:
        """The owner holds the state at `revision` (its own list, say): resume from it."""
        self.revision = revision
        self.last_sync = self.clock()

    async def run(
        self,
        on_list: Callable[[int, Sequence[KeyValue]], None],
        on_events: Callable[[WatchBatch], None],
    ) -> None:
        """List (unless already synced), then watch, until cancelled.

        `on_list(revision, kvs)` replaces the owner's state; `on_events(batch)` applies
        one watch response whole. Neither is called with a progress notification.
        """
        backoff = retry_backoff()
        while True:
            try:
                if self.revision == 0:
                    revision, kvs = await self.store.get_prefix(self.prefix)
                    on_list(revision, kvs)
                    self.synced(revision)
                    backoff.reset()
                watch = self.store.watch(
                    self.prefix, self.revision + 1, progress_every=self.progress_every
                )
                async for batch in watch:
                    backoff.reset()
                    self.last_sync = self.clock()
                    if not batch.events:
                        continue  # progress only: its revision is not ours to claim (#15220)
                    on_events(batch)
                    self.revision = max(self.revision, batch.revision)
            except Compacted as exc:
                self.resyncs += 1
                self.log.warning(
                    "watch history compacted, listing again",
                    revision=self.revision,
                    compact_revision=exc.compact_revision,
                )
                self.revision = 0
            except StoreError as exc:
                if not isinstance(exc, self.retried):
                    raise
                self.reconnects += 1
                delay = backoff.next_delay(cap=retry_cap(exc))
                self.log.warning(
                    "watch interrupted, resuming"
                    if isinstance(exc, Unavailable)
                    else "watch failed, retrying",
                    revision=self.revision,
                    error=str(exc),
                    attempt=backoff.attempt,
                    retry_in=round(delay, 2),
                )
                await asyncio.sleep(delay)


async def until(
    store: Store,
    prefix: str,
    check: Callable[[Mapping[str, bytes]], T | None],
    *,
    within: float,
) -> T:
    """Follow `prefix` until `check` returns something other than None, and return it.

    `check` sees every key under `prefix` with its value, as of one revision: once
    after the list, then after each batch of changes; nothing is polled for. Raises
    TimeoutError after `within` seconds, and the StoreError that ends the follow (it
    resumes only after Unavailable: a member down, no leader, a frozen member).
    """
    state: dict[str, bytes] = {}
    found: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def evaluate() -> None:
        result = check(state)
        if result is not None and not found.done():
            found.set_result(result)

    def on_list(revision: int, kvs: Sequence[KeyValue]) -> None:
        state.clear()
        state.update((kv.key, kv.value) for kv in kvs)
        evaluate()

    def on_events(batch: WatchBatch) -> None:
        for event in batch.events:
            if event.type == "delete":
                state.pop(event.kv.key, None)
            else:
                state[event.kv.key] = event.kv.value
        evaluate()

    follow = asyncio.create_task(
        Follow(store, prefix, retried=(Unavailable,)).run(on_list, on_events)
    )
    either: set[asyncio.Future[Any]] = {found, follow}
    try:
        async with asyncio.timeout(within):
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if found.done():
            return found.result()
        follow.result()  # the error that ended it
        raise AssertionError("unreachable: Follow.run returns only by raising")
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError, StoreError):
            await follow
