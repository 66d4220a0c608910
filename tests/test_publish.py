"""The reloader's status key on a real etcd: applies coalesced into few writes, the
newest revision always written in the end, a lone apply written at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from fluster import keys
from fluster.records import ReloaderStatus
from fluster.store import EtcdSettings, Store, open_store
from reloader.publish import Publisher
from tests.support.etcd import Etcd

PREFIX = "/fluster"


@pytest.fixture
async def store(etcd: Etcd) -> AsyncIterator[Store]:
    async with open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as st:
        yield st


async def applied(store: Store, revision: int, within: float = 5.0) -> float:
    """Seconds until the status key says `revision` (fails with what it last saw)."""
    started, seen = time.monotonic(), None
    while time.monotonic() - started < within:
        _, kv = await store.get(keys.reloader_key(PREFIX, "edge-1"))
        seen = ReloaderStatus.parse(kv.value).applied_revision if kv else None
        if seen == revision:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"status key says {seen} after {within} s, expected {revision}")


async def test_a_churn_of_applies_is_a_few_writes_and_ends_on_the_newest(store: Store) -> None:
    publisher = Publisher(store, PREFIX, "edge-1", "n1", every=0.25)
    task = asyncio.create_task(publisher.run())
    try:
        publisher.publish(1)  # after a quiet spell: at once
        assert publisher.writes == 1
        await applied(store, 1)

        started = time.monotonic()
        revision = 1
        while time.monotonic() - started < 1.0:  # a churn of about 200 applies a second
            revision += 1
            publisher.publish(revision)
            await asyncio.sleep(0.005)
        elapsed = time.monotonic() - started
        await applied(store, revision)
        assert revision > 100
        # One write per spell of 0.25 s, plus the one at its end.
        assert publisher.writes <= 2 + elapsed / 0.25 + 1, (publisher.writes, elapsed)
        assert publisher.written == revision
        writes = publisher.writes
        publisher.publish(revision)  # nothing new: nothing written
        assert publisher.writes == writes
    finally:
        task.cancel()
        await publisher.close()
