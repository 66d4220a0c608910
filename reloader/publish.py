"""`{prefix}/reloaders/{id}`: tells `fluster promote` which revision this edge applies.

The key is bound to our own lease, so a reloader that dies disappears from the list
instead of holding promotions back forever. It is rewritten only after an apply of a
change seen under `services/` (never on a timer), so reloaders never wake each other.
Granting, keeping alive, writing the key again after a lost lease and retrying errors
(AuthError included, with a longer wait) are `fluster.lease.Lease`'s job.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fluster import keys
from fluster.lease import Lease
from fluster.records import ReloaderStatus
from fluster.store import Store


class Publisher:
    def __init__(self, store: Store, prefix: str, reloader_id: str, node: str, ttl: int = 10):
        self.key = keys.reloader_key(prefix, reloader_id)
        self.node = node
        self.revision = 0
        self.lease = Lease(store, ttl, name=self.key)

    def publish(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            at = datetime.now(UTC).isoformat(timespec="milliseconds")
            self.lease.set(self.key, ReloaderStatus(revision, self.node, at).to_json())

    async def run(self) -> None:
        """Hold the lease and the key until cancelled (see fluster/lease.py)."""
        await self.lease.run()

    async def close(self) -> None:
        await self.lease.release()
