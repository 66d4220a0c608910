"""The catalog against a real etcd: list then watch, in order, resync on compaction."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Literal, cast

import pytest

from fluster.catalog import Catalog, Snapshot
from fluster.records import Instance
from fluster.store import EtcdSettings, Event, KeyValue, Store, open_store
from tests.support.etcd import Etcd, eventually

PREFIX = "/fluster"


def ikey(service: str, instance: str) -> str:
    return f"{PREFIX}/services/{service}/instances/{instance}"


def state_of(snapshot: Snapshot) -> dict[str, dict[str, Instance]]:
    return {name: dict(svc.instances) for name, svc in snapshot.services.items()}


async def etcd_state(store: Store, revision: int = 0) -> dict[str, dict[str, Instance]]:
    """What the catalog should hold, computed independently from a raw range read."""
    _, kvs = await store.get_prefix(f"{PREFIX}/services/", revision=revision)
    out: dict[str, dict[str, Instance]] = {}
    for kv in kvs:
        parts = kv.key.split("/")
        if parts[4] == "instances":
            out.setdefault(parts[3], {})[parts[5]] = Instance.parse(kv.value)
    return out


@pytest.fixture
async def store(etcd: Etcd) -> AsyncIterator[Store]:
    async with open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as st:
        yield st


@pytest.fixture
async def running(store: Store) -> AsyncIterator[tuple[Catalog, list[Snapshot]]]:
    catalog = Catalog(store, PREFIX, progress_every=0.5)
    seen: list[Snapshot] = []
    task = asyncio.create_task(catalog.run(seen.append))
    await eventually(lambda: seen, what="first snapshot")
    yield catalog, seen
    task.cancel()


async def test_list_then_watch_sees_every_change_in_order(
    store: Store, running: tuple[Catalog, list[Snapshot]]
) -> None:
    catalog, seen = running
    for i in range(60):
        service = f"svc{i % 3}"
        await store.put(ikey(service, f"i{i % 7}"), f"10.0.0.{i % 250 + 1}:{8000 + i}")
        if i % 5 == 4:
            await store.delete(ikey(service, f"i{(i + 3) % 7}"))
    last = await store.put(f"{PREFIX}/services/marker/instances/end", "10.9.9.9:1")
    await eventually(lambda: catalog.revision >= last, what="catalog catches up")

    revisions = [s.revision for s in seen]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    # Every snapshot the catalog ever published equals etcd at that revision.
    for snapshot in seen:
        assert state_of(snapshot) == await etcd_state(store, snapshot.revision)


async def test_invalid_records_are_skipped_counted_and_hide_nothing(
    store: Store, running: tuple[Catalog, list[Snapshot]]
) -> None:
    catalog, _ = running
    await store.put(ikey("web", "good"), "10.0.0.1:80")
    await store.put(ikey("web", "bad"), json.dumps({"host": "10.0.0.2\nbackend x", "port": 80}))
    await store.put(ikey("web", "bad name!"), "10.0.0.3:80")
    await store.put(f"{PREFIX}/services/Bad_Service/instances/a", "10.0.0.4:80")
    last = await store.put(f"{PREFIX}/services/web/spec", "{'mode': nope}")
    await eventually(lambda: catalog.revision >= last)

    web = catalog.snapshot.services["web"]
    assert list(web.instances) == ["good"]
    assert not web.has_spec  # an invalid spec means defaults, never a half-read one
    assert "Bad_Service" not in catalog.snapshot.services
    assert len(catalog.snapshot.rejected) == 4
    assert catalog.rejected_total == 4

    # Overwriting a good record with garbage removes it; fixing it brings it back.
    await store.put(ikey("web", "good"), "garbage")
    # (web then has no valid record at all, so the service itself disappears)
    await eventually(lambda: "web" not in catalog.snapshot.services)
    await store.put(ikey("web", "good"), "10.0.0.1:81")
    await eventually(lambda: "web" in catalog.snapshot.services)
    assert catalog.snapshot.services["web"].instances["good"].port == 81
    assert ikey("web", "good") not in catalog.snapshot.rejected


async def test_compaction_during_watch_resyncs_to_etcds_state(store: Store) -> None:
    """Changes on both sides of a compaction, including deletes, end equal to etcd."""
    catalog = Catalog(store, PREFIX, progress_every=0.5)
    for i in range(10):
        await store.put(ikey("web", f"i{i}"), f"10.0.0.{i + 1}:80")
    task = asyncio.create_task(catalog.run(lambda s: None))
    await eventually(lambda: len(catalog.snapshot.services.get("web", {}).instances) == 10)  # type: ignore[union-attr]
    task.cancel()

    # While the catalog is away: deletes and puts, then the history is compacted.
    for i in range(5):
        await store.delete(ikey("web", f"i{i}"))
    await store.put(ikey("api", "a"), "10.0.1.1:80")
    rev = await store.put(ikey("web", "i9"), "10.0.0.99:80")
    await store.compact(rev)
    after = await store.put(ikey("api", "b"), "10.0.1.2:80")

    task = asyncio.create_task(catalog.run(lambda s: None))
    try:
        await eventually(lambda: catalog.revision >= after, what="resync")
        assert catalog.resyncs == 1
        assert state_of(catalog.snapshot) == await etcd_state(store)
        assert sorted(catalog.snapshot.services["web"].instances) == [f"i{i}" for i in range(5, 10)]
    finally:
        task.cancel()


async def test_sync_age_is_refreshed_by_progress_notifications(
    running: tuple[Catalog, list[Snapshot]],
) -> None:
    catalog, _ = running
    # Nothing changes in etcd, yet the catalog hears from it every progress interval.
    first = catalog.last_sync
    await eventually(lambda: catalog.last_sync != first, timeout=5)
    age = catalog.sync_age()
    assert age is not None and age < 2


async def test_an_invalid_spec_keeps_the_last_good_one(
    store: Store, running: tuple[Catalog, list[Snapshot]]
) -> None:
    """Falling back to the defaults would route every version again: undo a promotion."""
    catalog, _ = running
    spec_key = f"{PREFIX}/services/web/spec"
    await store.put(ikey("web", "a"), json.dumps({"host": "10.0.0.1", "port": 80, "version": "v2"}))
    await store.put(spec_key, json.dumps({"active_version": "v2"}))
    await eventually(
        lambda: (
            "web" in catalog.snapshot.services
            and catalog.snapshot.services["web"].spec.active_version == "v2"
        ),
        what="promoted spec",
    )
    bad = await store.put(spec_key, json.dumps({"active_version": "v2", "balance": "fastest"}))
    await eventually(lambda: catalog.revision >= bad, what="invalid spec seen")
    web = catalog.snapshot.services["web"]
    assert web.spec.active_version == "v2" and web.has_spec
    assert web.spec_revision == bad  # an operator's compare-and-swap fix replaces it
    assert catalog.specs_kept_total == 1
    assert "last good spec is kept" in catalog.snapshot.rejected[spec_key]

    # A relist (as after compaction) keeps it too; a valid spec replaces it.
    await catalog.load()
    assert catalog.snapshot.services["web"].spec.active_version == "v2"
    kept = catalog.specs_kept_total
    fixed = await store.put(spec_key, json.dumps({"active_version": "v1"}))
    await eventually(lambda: catalog.revision >= fixed, what="fixed spec seen")
    assert catalog.snapshot.services["web"].spec.active_version == "v1"
    assert spec_key not in catalog.snapshot.rejected

    # Deleted on purpose: the defaults apply, and a later invalid spec has nothing to keep.
    await store.delete(spec_key)
    again = await store.put(spec_key, "{not json")
    await eventually(lambda: catalog.revision >= again, what="second invalid spec seen")
    web = catalog.snapshot.services["web"]
    assert web.spec.active_version is None and not web.has_spec
    assert catalog.specs_kept_total == kept


def test_a_membership_change_keeps_the_order_and_the_other_services_objects() -> None:
    """The snapshot's services stay sorted by name while services come and go, and a
    change keeps every other service's object (what the reloader's per-service memos
    rely on, issue 15). Pure: the events are fed to the catalog directly, so no store
    is needed (the cast stands in for one that is never called)."""
    catalog = Catalog(cast(Store, None), PREFIX)
    value = json.dumps({"host": "10.0.0.1", "port": 80}).encode()
    listed = catalog._listed(10, [KeyValue(ikey(s, "a"), value, 10, 10) for s in "dbf"])
    assert list(listed.services) == ["b", "d", "f"]

    def event(rev: int, kind: Literal["put", "delete"], service: str) -> Snapshot:
        kv = KeyValue(ikey(service, "x"), value if kind == "put" else b"", rev, rev)
        touched = catalog._apply(Event(kind, kv), rev)
        return catalog._publish(rev, {touched} if touched else set())

    grown = event(11, "put", "d")
    assert list(grown.services) == ["b", "d", "f"]
    assert (
        grown.services["b"] is listed.services["b"] and grown.services["f"] is listed.services["f"]
    )
    assert grown.services["d"] is not listed.services["d"]
    added = event(12, "put", "a")
    assert list(added.services) == ["a", "b", "d", "f"]
    assert added.services["d"] is grown.services["d"]
    event(13, "put", "e")
    gone = event(14, "delete", "a")
    assert list(gone.services) == ["b", "d", "e", "f"]
    assert list(event(15, "put", "c").services) == ["b", "c", "d", "e", "f"]
