"""The catalog's revision must never run ahead of the events it has applied.

The catalog asks etcd for a progress notification every `progress_every` seconds (proof
the stream is alive); it used to take the notification's revision as its own. etcd 3.4.23 (the
Debian 12 package) can send that notification ahead of events still queued for the same
watcher (etcd-io/etcd#15220, fixed in 3.5.8 and backported to 3.4). The catalog then
publishes a snapshot that claims revision R while missing writes at or below R, which
matters twice:

- the reloader publishes that revision as applied, so `fluster promote` may stop waiting
  before the edge has the change;
- if the stream breaks right then, the catalog resumes from R + 1 and the missing events
  are never delivered: HAProxy stays out of step with etcd until a relist.

Fix on fluster's side (fluster/catalog.py): a progress notification refreshes the sync
age but does not advance the revision the catalog resumes from or publishes.
"""

from __future__ import annotations

import asyncio

import pytest

from fluster.catalog import Catalog
from fluster.store import EtcdSettings, open_store
from tests.support.etcd import Etcd, eventually

pytestmark = pytest.mark.slow


async def test_snapshot_revision_never_runs_ahead_of_its_events(etcd: Etcd) -> None:
    settings = EtcdSettings(endpoints=etcd.endpoint_list)
    async with open_store(settings) as reader, open_store(settings) as writer:
        catalog = Catalog(reader, "/fluster", progress_every=0.005)
        task = asyncio.create_task(catalog.run(lambda s: None))
        written: dict[str, int] = {}  # instance -> revision of its put
        ahead: list[str] = []

        async def write(worker: int) -> None:
            for i in range(150):
                name = f"w{worker}-{i}"
                key = f"/fluster/services/web/instances/{name}"
                written[name] = await writer.put(key, f"10.0.0.1:{1000 + i}")

        async def check() -> None:
            """Every snapshot the catalog publishes, checked once: a scan costs O(puts),
            and re-scanning the same snapshot every millisecond starved the catalog it
            shares the loop with on a busy machine."""
            checked = -1
            while True:
                snap = catalog.snapshot
                if snap.revision != checked:
                    checked = snap.revision
                    web = snap.services.get("web")
                    have = set(web.instances) if web else set()
                    missing = [
                        n for n, r in list(written.items()) if r <= snap.revision and n not in have
                    ]
                    if missing:
                        ahead.append(f"revision {snap.revision} lacks {len(missing)} earlier puts")
                await asyncio.sleep(0.001)

        def seen() -> str:
            web = catalog.snapshot.services.get("web")
            return (
                f"2400 instances in the catalog; it has {len(web.instances) if web else 0} at "
                f"revision {catalog.snapshot.revision}, etcd is at {max(written.values())}; "
                f"snapshots ahead of their events: {ahead[:3]}"
            )

        try:
            await eventually(lambda: catalog.revision > 0, what="first list")
            checker = asyncio.create_task(check())
            await asyncio.gather(*(write(w) for w in range(16)))
            try:
                await eventually(
                    lambda: len(catalog.snapshot.services["web"].instances) == 2400, timeout=30
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nwanted {seen()}") from None
            checker.cancel()
        finally:
            task.cancel()
        assert ahead == [], ahead[:5]
