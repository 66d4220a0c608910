"""fluster.lease against a real etcd: keys bound to a lease, loss, re-grant, lock use."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fluster.lease import Lease
from fluster.store import Conflict, EtcdSettings, Store, open_store
from tests.support.etcd import Etcd, eventually


@pytest.fixture(params=["grpc", "http"])
async def store(etcd: Etcd, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    async with open_store(
        EtcdSettings(endpoints=etcd.endpoint_list, transport=request.param)
    ) as st:
        yield st


async def _lease_of(store: Store, key: str) -> int:
    _, kv = await store.get(key)
    return 0 if kv is None else kv.lease


async def test_a_lock_is_exclusive_and_freed_on_exit(store: Store) -> None:
    key = "/t/apps/web/lock"
    async with Lease(store, 10, name="first") as first:
        await first.put_if_absent(key, "deploy-1")
        assert first.holds(key)
        assert await _lease_of(store, key) == first.id
        async with Lease(store, 10, name="second") as second:
            with pytest.raises(Conflict):
                await second.put_if_absent(key, "deploy-2")
            assert not second.holds(key)
    # Revoked on exit: the key goes at once, not one TTL later.
    assert (await store.get(key))[1] is None


async def test_a_revoked_lease_is_granted_again_and_its_keys_written_again(
    store: Store, etcd: Etcd
) -> None:
    lost: list[int] = []
    lease = Lease(store, 5, name="status")
    runner = asyncio.create_task(lease.run())
    try:
        lease.set("/t/reloaders/a", "1")
        old = await eventually(lambda: _lease_of(store, "/t/reloaders/a"), what="key written")
        lease.on_lost = lambda: lost.append(1)
        etcd.ctl("lease", "revoke", f"{old:x}", check=True)  # an operator, behind our back
        new = await eventually(
            lambda: _lease_of(store, "/t/reloaders/a"), what="key written under a new lease"
        )
        assert new != old and new == lease.id
        assert lost == [1] and lease.losses == 1
        lease.set("/t/reloaders/a", "2")
        await eventually(
            lambda: _value_is(store, "/t/reloaders/a", b"2"), what="the newer value written"
        )
    finally:
        runner.cancel()
        await lease.release()
    assert (await store.get("/t/reloaders/a"))[1] is None


async def test_a_lock_lost_to_another_holder_is_not_taken_back(store: Store, etcd: Etcd) -> None:
    key = "/t/apps/web/lock"
    lease = Lease(store, 5, name="first")
    await lease.put_if_absent(key, "deploy-1")
    old = lease.id
    assert old is not None
    etcd.ctl("lease", "revoke", f"{old:x}", check=True)
    await eventually(lambda: lease.losses == 1, what="the keeper noticing the loss")
    assert lease.holds(key), "still wanted until we know whether it can be taken again"
    await store.put(key, "deploy-2")  # another deployer got the lock meanwhile
    runner = asyncio.create_task(lease.run())
    try:
        await eventually(lambda: not lease.holds(key), what="the lock given up")
        assert lease.id not in (None, old)
        _, kv = await store.get(key)
        assert kv is not None and kv.value == b"deploy-2" and kv.lease == 0
    finally:
        runner.cancel()
        await lease.release()


async def _value_is(store: Store, key: str, value: bytes) -> bool:
    _, kv = await store.get(key)
    return kv is not None and kv.value == value


async def test_a_lost_lease_is_granted_again_only_after_its_holdoff(
    store: Store, etcd: Etcd
) -> None:
    """After a loss, `run()` waits the random hold-off drawn at the loss (here the
    whole spread) before it grants again: a fleet whose leases went at once does not
    come back in one second."""
    lease = Lease(store, 5, name="status", spread=1.5, jitter=lambda low, high: high)
    lost_at: list[float] = []
    lease.on_lost = lambda: lost_at.append(asyncio.get_running_loop().time())
    runner = asyncio.create_task(lease.run())
    try:
        lease.set("/t/reloaders/a", "1")
        old = await eventually(lambda: _lease_of(store, "/t/reloaders/a"), what="key written")
        etcd.ctl("lease", "revoke", f"{old:x}", check=True)
        await eventually(lambda: lost_at, what="the loss noticed")
        await eventually(
            lambda: _lease_of(store, "/t/reloaders/a"), what="key written under a new lease"
        )
        assert asyncio.get_running_loop().time() - lost_at[0] >= 1.5
        assert lease.holdoff() == 0.0
    finally:
        runner.cancel()
        await lease.release()
