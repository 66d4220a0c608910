"""`{prefix}/reloaders/{id}`: tells `fluster promote` which revision this edge applies.

The key is bound to our own lease, so a reloader that dies disappears from the list
instead of holding promotions back forever. It is rewritten only after an apply of a
change seen under `services/` (never on a timer), so reloaders never wake each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import structlog

from fluster import keys
from fluster.records import ReloaderStatus
from fluster.runtime import Backoff
from fluster.store import LeaseLost, Store, StoreError, Unavailable

log = structlog.get_logger("reloader.publish")


class Publisher:
    def __init__(self, store: Store, prefix: str, reloader_id: str, node: str, ttl: int = 10):
        self.store = store
        self.key = keys.reloader_key(prefix, reloader_id)
        self.node = node
        self.ttl = ttl
        self.revision = 0
        self.lease = 0
        self.published = 0
        self._changed = asyncio.Event()

    def publish(self, revision: int) -> None:
        if revision > self.revision:
            self.revision = revision
            self._changed.set()

    async def _put(self) -> None:
        status = ReloaderStatus(
            self.revision, self.node, datetime.now(UTC).isoformat(timespec="milliseconds")
        )
        await self.store.put(self.key, status.to_json(), lease=self.lease)
        self.published = self.revision

    async def _keepalive(self) -> None:
        async for _ttl in self.store.keepalive(self.lease, self.ttl / 3):
            pass
        raise Unavailable("lease keepalive ended")

    async def run(self) -> None:
        backoff = Backoff(base=0.2, cap=5.0)
        while True:
            keepalive: asyncio.Task[None] | None = None
            try:
                self.lease = await self.store.grant(self.ttl)
                keepalive = asyncio.create_task(self._keepalive(), name="reloader-lease")
                while True:
                    if self.revision:
                        self._changed.clear()
                        await self._put()
                        backoff.reset()
                    changed = asyncio.create_task(self._changed.wait())
                    try:
                        await asyncio.wait({changed, keepalive}, return_when="FIRST_COMPLETED")
                    finally:
                        changed.cancel()
                    if keepalive.done():
                        keepalive.result()
            except (Unavailable, LeaseLost) as exc:
                log.warning(
                    "status key lost, publishing again",
                    key=self.key,
                    error=str(exc),
                    attempt=backoff.attempt + 1,
                )
                await asyncio.sleep(backoff.next_delay())
            finally:
                if keepalive is not None:
                    keepalive.cancel()

    async def close(self) -> None:
        if self.lease:
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(2):
                    await self.store.revoke(self.lease)
