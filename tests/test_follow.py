"""fluster.follow against a real etcd: list, watch, progress, resume, relist, until."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest

from fluster.follow import Follow, until
from fluster.store import EtcdSettings, KeyValue, Store, WatchBatch, open_store
from tests.support.etcd import Etcd, eventually


@pytest.fixture(params=["grpc", "http"])
async def store(etcd: Etcd, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    async with open_store(
        EtcdSettings(endpoints=etcd.endpoint_list, transport=request.param)
    ) as st:
        yield st


class Mirror:
    """The simplest owner: a dict of the keys, and what it was told."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.lists: list[int] = []
        self.batches: list[WatchBatch] = []

    def on_list(self, revision: int, kvs: Sequence[KeyValue]) -> None:
        self.lists.append(revision)
        self.keys = {kv.key: kv.value for kv in kvs}

    def on_events(self, batch: WatchBatch) -> None:
        self.batches.append(batch)
        for ev in batch.events:
            if ev.type == "put":
                self.keys[ev.kv.key] = ev.kv.value
            else:
                self.keys.pop(ev.kv.key, None)


@contextlib.asynccontextmanager
async def following(follow: Follow, mirror: Mirror) -> AsyncIterator[None]:
    task = asyncio.create_task(follow.run(mirror.on_list, mirror.on_events))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_lists_then_watches_from_the_listed_revision(store: Store) -> None:
    listed = await store.put("/f/a", "1")
    follow, mirror = Follow(store, "/f/", progress_every=0.5), Mirror()
    async with following(follow, mirror):
        await eventually(lambda: mirror.lists, what="the first list")
        assert mirror.lists == [listed] and follow.revision == listed
        changed = await store.put("/f/b", "2")
        await eventually(lambda: follow.revision == changed, what="the put applied")
        assert mirror.keys == {"/f/a": b"1", "/f/b": b"2"}
        assert [len(b.events) for b in mirror.batches] == [1]


async def test_progress_refreshes_the_sync_age_but_not_the_revision(store: Store) -> None:
    revision = await store.put("/f/a", "1")
    await store.put("/elsewhere", "x")  # the store moves on; our prefix does not
    follow, mirror = Follow(store, "/f/", progress_every=0.2), Mirror()
    async with following(follow, mirror):
        await eventually(lambda: mirror.lists, what="the first list")
        first = follow.last_sync
        await eventually(lambda: follow.last_sync != first, what="a progress notification")
        assert mirror.batches == [], "a progress notification is not a change"
        # The list saw the later revision; only events may move it, never progress.
        assert follow.revision == mirror.lists[0] >= revision


async def test_resumes_where_it_was_and_lists_again_after_compaction(store: Store) -> None:
    await store.put("/f/a", "1")
    await store.put("/f/b", "1")
    follow, mirror = Follow(store, "/f/", progress_every=0.5), Mirror()
    async with following(follow, mirror):
        await eventually(lambda: mirror.lists, what="the first list")
    # Away: a delete, then its history compacted. Resuming would skip the delete.
    await store.delete("/f/a")
    await store.compact(await store.put("/f/c", "1"))
    async with following(follow, mirror):
        await eventually(lambda: len(mirror.lists) == 2, what="a second list")
        assert follow.resyncs == 1
        assert mirror.keys == {"/f/b": b"1", "/f/c": b"1"}


async def test_until_returns_what_the_check_finds_as_keys_come_and_go(store: Store) -> None:
    """`until` is how a one-off command waits on etcd (edges applied, a lock freed, a
    version registered up): the check sees the keys after the list and after each
    change, deletes included; nothing is polled."""
    await store.put("/w/a", "1")
    seen: list[dict[str, bytes]] = []

    def both_gone_after_b(kvs: Mapping[str, bytes]) -> str | None:
        seen.append(dict(kvs))
        if any("/w/b" in s for s in seen) and not kvs:
            return "emptied"
        return None

    waiting = asyncio.create_task(until(store, "/w/", both_gone_after_b, within=10))
    await eventually(lambda: seen, what="the check called after the list")
    assert seen[0] == {"/w/a": b"1"}
    await store.put("/w/b", "2")
    await eventually(lambda: {"/w/a": b"1", "/w/b": b"2"} in seen, what="the put seen")
    await store.delete("/w/", prefix=True)
    assert await waiting == "emptied"

    with pytest.raises(TimeoutError):
        await until(store, "/w/", lambda kvs: None, within=0.3)
