"""`{prefix}/reloaders/{id}`: tells `fluster promote` which revision this edge applies.

The key is bound to our own lease, so a reloader that dies disappears from the list
instead of holding promotions back forever. It is rewritten only after an apply of a
change seen under `services/` (never on a timer), so reloaders never wake each other.

Writes are coalesced so that bookkeeping does not grow with edges x changes: an apply
after a quiet spell is written at once (what `fluster promote` waits for), applies that
follow within `EVERY` seconds are folded into one write of the newest revision at the
end of that spell. Under a churn of any rate an edge writes at most 1 / EVERY times a
second; a waiter learns of an applied revision at most EVERY seconds late, never early.
Granting, keeping alive, writing the key again after a lost lease and retrying errors
(AuthError included, with a longer wait) are `fluster.lease.Lease`'s job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fluster import keys
from fluster.lease import Lease
from fluster.records import ReloaderStatus
from fluster.store import Store

EVERY = 0.25  # seconds: at most four status writes a second per edge


class Publisher:
    def __init__(
        self,
        store: Store,
        prefix: str,
        reloader_id: str,
        node: str,
        ttl: int = 10,
        *,
        every: float = EVERY,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.key = keys.reloader_key(prefix, reloader_id)
        self.node = node
        self.revision = 0  # the newest applied
        self.written = 0  # the newest handed to the lease to write
        self.writes = 0
        self.every, self.clock = every, clock
        self._last_write = -every
        self._later: asyncio.TimerHandle | None = None
        self.lease = Lease(store, ttl, name=self.key)

    def publish(self, revision: int) -> None:
        """`revision` is applied: written now after a quiet spell, else at its end."""
        if revision <= self.revision:
            return
        self.revision = revision
        if self._later is not None:
            return  # the write at the end of this spell takes the newest revision
        wait = self._last_write + self.every - self.clock()
        if wait <= 0:
            self._write()
        else:
            self._later = asyncio.get_running_loop().call_later(wait, self._write)

    def _write(self) -> None:
        self._later = None
        self._last_write = self.clock()
        self.written, self.writes = self.revision, self.writes + 1
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.lease.set(self.key, ReloaderStatus(self.revision, self.node, at).to_json())

    async def run(self) -> None:
        """Hold the lease and the key until cancelled (see fluster/lease.py)."""
        await self.lease.run()

    async def close(self) -> None:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        await self.lease.release()
