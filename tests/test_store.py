"""The store against a real etcd: reads, compare-and-swap, leases, watches."""

from __future__ import annotations

import asyncio

import pytest

from fluster.store import Compacted, Conflict, EtcdSettings, LeaseLost, Store, open_store
from tests.support.etcd import Etcd


@pytest.fixture(params=["grpc", "http"])
async def store(etcd: Etcd, request: pytest.FixtureRequest):
    async with open_store(
        EtcdSettings(endpoints=etcd.endpoint_list, transport=request.param)
    ) as st:
        yield st


async def test_put_get_prefix(store: Store) -> None:
    await store.put("/t/a", "1")
    await store.put("/t/b", b"2")
    await store.put("/u/c", "3")
    revision, kvs = await store.get_prefix("/t/")
    assert [(kv.key, kv.value) for kv in kvs] == [("/t/a", b"1"), ("/t/b", b"2")]
    assert revision >= 4


async def test_replace_detects_a_concurrent_write(store: Store) -> None:
    await store.replace("/t/spec", "v1", mod_revision=0)
    _, kv = await store.get("/t/spec")
    assert kv is not None
    await store.put("/t/spec", "someone else")
    with pytest.raises(Conflict):
        await store.replace("/t/spec", "v2", mod_revision=kv.mod_revision)
    with pytest.raises(Conflict):
        await store.replace("/t/spec", "v3", mod_revision=0)


async def test_keepalive_stream_and_lost_lease(store: Store) -> None:
    lease = await store.grant(5)
    await store.put("/t/leased", "x", lease=lease)
    ttls = []
    async for ttl in store.keepalive(lease, 0.1):
        ttls.append(ttl)
        if len(ttls) == 3:
            break
    assert ttls == [5, 5, 5]
    await store.revoke(lease)
    assert (await store.get("/t/leased"))[1] is None
    with pytest.raises(LeaseLost):
        async for _ in store.keepalive(lease, 0.1):
            pass


async def test_watch_reports_compaction(store: Store, etcd: Etcd) -> None:
    first = await store.put("/t/k", "1")
    await store.put("/t/k", "2")
    await store.put("/t/k", "3")
    await store.compact(first + 1)

    async def drain() -> None:
        async for _ in store.watch("/t/", first):
            pass

    with pytest.raises(Compacted):
        await asyncio.wait_for(drain(), 5)


async def test_calls_connect_lazily(etcd: Etcd) -> None:
    store = open_store(EtcdSettings(endpoints=etcd.endpoint_list))
    try:
        assert (await store.get("/nothing"))[1] is None
    finally:
        await store.close()
