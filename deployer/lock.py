"""One deploy per app at a time: `{prefix}/apps/{app}/lock`, bound to this process's lease.

The key holds the running deploy's id. It is created only if absent (a transaction on
mod revision 0) and lives as long as the lease: a deploy that finishes revokes it, one
whose process died loses it when the lease's TTL runs out, so a crashed deploy never
blocks the next one for longer than the TTL. A second deploy waits, saying for whom,
and gives up after `wait_limit` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from deployer.engine import DeployError
from fluster import keys
from fluster.store import Conflict, LeaseLost, Store, StoreError

TTL = 10


async def _keep(store: Store, lease: int, lost: asyncio.Event) -> None:
    try:
        async for _ in store.keepalive(lease, TTL / 3):
            pass
    except (LeaseLost, StoreError):
        lost.set()


@contextlib.asynccontextmanager
async def deploy_lock(
    store: Store,
    prefix: str,
    app: str,
    deploy_id: str,
    *,
    wait_limit: float,
    say: Callable[[str], None],
    poll: float = 0.2,
) -> AsyncIterator[asyncio.Event]:
    """Hold the app's lock for the block; yields an event set if the lease is lost."""
    key = keys.app_lock_key(prefix, app)
    lease = await store.grant(TTL)
    lost = asyncio.Event()
    keeper = asyncio.create_task(_keep(store, lease, lost), name=f"lock {app}")
    try:
        deadline = time.monotonic() + wait_limit
        waited_for = None
        while True:
            try:
                await store.replace(key, deploy_id, mod_revision=0, lease=lease)
                break
            except Conflict:
                _, kv = await store.get(key)
                holder = kv.value.decode(errors="replace") if kv else None
                if holder and holder != waited_for:
                    say(f"waiting for deploy {holder} to finish")
                    waited_for = holder
                if time.monotonic() > deadline:
                    raise DeployError(
                        f"deploy {holder} of {app} still running after {wait_limit:g}s; "
                        "try again later"
                    ) from None
                await asyncio.sleep(poll)
        yield lost
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        with contextlib.suppress(StoreError):
            await store.revoke(lease)
