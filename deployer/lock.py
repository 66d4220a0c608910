"""One deploy per app at a time: `{prefix}/apps/{app}/lock`, bound to this process's lease.

The key holds the running deploy's id. It is taken only if absent (`Lease.put_if_absent`)
and lives as long as the lease: a deploy that finishes revokes it, one whose process
died loses it when the lease's TTL runs out, so a crashed deploy never blocks the next
one for longer than the TTL. A second deploy waits, saying for whom, and gives up after
`wait_limit` seconds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from deployer.engine import DeployError
from fluster import keys
from fluster.follow import until
from fluster.lease import Lease
from fluster.store import Conflict, Store

TTL = 10


@asynccontextmanager
async def deploy_lock(
    store: Store,
    prefix: str,
    app: str,
    deploy_id: str,
    *,
    wait_limit: float,
    say: Callable[[str], None],
) -> AsyncIterator[Callable[[], bool]]:
    """Hold the app's lock for the block; yields `held()`, False once the lock is lost
    (the lease expired during a partition and another deploy took the key)."""
    key = keys.app_lock_key(prefix, app)
    async with Lease(store, ttl=TTL, name=f"deploy lock of {app}") as lease:
        deadline = time.monotonic() + wait_limit
        waited_for = None
        while True:
            try:
                await lease.put_if_absent(key, deploy_id)
                break
            except Conflict:
                _, kv = await store.get(key)
                holder = kv.value.decode(errors="replace") if kv else None
                if holder and holder != waited_for:
                    say(f"waiting for deploy {holder} to finish")
                    waited_for = holder
                try:  # the key is deleted (or expires with its lease): try again
                    await until(
                        store,
                        key,
                        lambda kvs: True if key not in kvs else None,
                        within=deadline - time.monotonic(),
                    )
                except TimeoutError:
                    raise DeployError(
                        f"deploy {holder} of {app} still running after {wait_limit:g}s; "
                        "try again later"
                    ) from None
        yield lambda: lease.holds(key)
