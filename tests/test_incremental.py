"""The reloader's per-change shortcuts give what the whole computation gives (issue 15).

A membership change is handled by looking at the changed services only: the catalog's
`Snapshot.layout` says when services and specs are as before, `ServiceCache.quick` makes
the next model from the last one, and the TLS target, host facts, fallback reports and
change descriptions keep what they worked out. Each shortcut is checked here against the
whole computation over random sequences of records fed to a real Catalog (pure: events
are given to the catalog directly, so no store is needed; the cast stands in for one
that is never called).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, cast

from hypothesis import given, settings
from hypothesis import strategies as st

from fluster import routing
from fluster.catalog import Catalog, Snapshot, changed_services
from fluster.store import Event, KeyValue, Store
from reloader.build import ServiceCache, build_model
from reloader.facts import Reporter
from reloader.model import Backend, RenderSettings, Server
from reloader.runtime_api import Plan, server_changes
from reloader.targets import HostFacts, Resolver

PREFIX = "/fluster"
SETTINGS = RenderSettings(
    state_dir=Path("/run/reloader"), http_bind=("127.0.0.1", 8080), pool_size=2
)
SERVICES = ("a", "b", "c", "d")

INSTANCES = st.fixed_dictionaries(
    {
        "host": st.sampled_from(["10.0.0.1", "10.0.0.2", "web.internal", "0.0.0.0"]),
        "port": st.sampled_from([80, 81, 5000]),
        "version": st.sampled_from(["", "v1", "v2"]),
        "state": st.sampled_from(["up", "up", "draining"]),
        "weight": st.sampled_from([1, 100]),
    }
)
SPECS = st.one_of(
    st.just({}),
    st.just({"hosts": ["shared.example"]}),
    st.just({"hosts": ["shared.example"], "path_prefix": "/api"}),
    st.just({"mode": "tcp", "port": 5000}),
    st.just({"mode": "tcp", "port": 5001}),
    st.just({"active_version": "v1"}),
    st.just({"active_version": "v1", "canary": {"version": "v2", "weight": 30}}),
    st.just({"balance": "source"}),
    st.just({"check": {"path": "/health"}}),
)
EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(SERVICES), st.sampled_from("xyz"), INSTANCES),
        st.tuples(st.just("delete"), st.sampled_from(SERVICES), st.sampled_from("xyz"), st.none()),
        st.tuples(st.just("spec"), st.sampled_from(SERVICES), st.just(""), SPECS),
        st.tuples(st.just("unspec"), st.sampled_from(SERVICES), st.just(""), st.none()),
    ),
    min_size=1,
    max_size=40,
)
FACTS = HostFacts(addresses={"web.internal": "10.0.0.9"})


class Feed:
    def __init__(self) -> None:
        self.catalog = Catalog(cast(Store, None), PREFIX)
        self.revision = 1

    def __call__(self, kind: str, service: str, instance: str, value: object) -> Snapshot:
        self.revision += 1
        base = f"{PREFIX}/services/{service}"
        key = f"{base}/spec" if kind in ("spec", "unspec") else f"{base}/instances/{instance}"
        action: Literal["put", "delete"] = "put" if kind in ("put", "spec") else "delete"
        raw = json.dumps(value).encode() if value is not None else b""
        kv = KeyValue(key, raw, self.revision, self.revision)
        touched = self.catalog._apply(Event(action, kv), self.revision)
        return self.catalog._publish(self.revision, {touched} if touched else set())


@settings(max_examples=150, deadline=None)
@given(EVENTS)
def test_models_made_from_the_last_one_equal_whole_builds(events: list[tuple]) -> None:
    feed, cache = Feed(), ServiceCache()
    reporter, resolver = Reporter(), Resolver()
    before = Snapshot()
    for event in events:
        snap = feed(*event)
        for svc in snap.services.values():  # kept in order without a sort at every change
            assert list(svc.instances) == sorted(svc.instances)
            assert svc.routed() == {
                n: i
                for n, i in svc.instances.items()
                if i.state == "up" and svc.spec.routes_version(i.version)
            }
        if snap.same_layout(before):
            assert snap.services.keys() == before.services.keys()
            for name, svc in snap.services.items():
                assert svc.spec == before.services[name].spec
        # By identity: a service the catalog froze again unchanged counts too.
        changed = changed_services(before, snap)
        assert changed >= {
            n
            for n in snap.services.keys() | before.services.keys()
            if snap.services.get(n) != before.services.get(n)
        }
        built = build_model(snap, SETTINGS, FACTS, cache=cache)
        assert built == build_model(snap, SETTINGS, FACTS), event
        reporter.report(built, snap, resolver)
        assert reporter.fallbacks == {
            name: version
            for name, svc in snap.services.items()
            if (version := routing.routing(svc).fallback) is not None
        }
        before = snap


def test_a_membership_change_is_made_from_the_last_model() -> None:
    feed, cache = Feed(), ServiceCache()
    up = {"host": "10.0.0.1", "port": 80}
    feed("spec", "a", "", {"hosts": ["a.example"]})
    feed("put", "a", "x", up)
    first = feed("put", "b", "x", up)
    build_model(first, SETTINGS, FACTS, cache=cache)
    for i, instance in enumerate("yzyz"):
        snap = feed("put" if i < 2 else "delete", "a", instance, {**up, "port": 81 + i})
        assert snap.same_layout(first)
        assert build_model(snap, SETTINGS, FACTS, cache=cache) == build_model(snap, SETTINGS, FACTS)
    assert cache.quick_builds == 4
    # A new spec is another layout: a whole build.
    moved = feed("spec", "b", "", {"hosts": ["b.example"]})
    assert not moved.same_layout(first)
    build_model(moved, SETTINGS, FACTS, cache=cache)
    assert cache.quick_builds == 4


SERVERS = st.lists(
    st.builds(
        Server,
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.just("10.0.0.1"),
        st.sampled_from([80, 81]),
        st.sampled_from([1, 100]),
    ),
    unique_by=lambda s: s.name,
    max_size=5,
).map(lambda servers: tuple(sorted(servers, key=lambda s: s.name)))


@settings(max_examples=300, deadline=None)
@given(SERVERS, SERVERS, st.data())
def test_server_changes_walk_equals_a_comparison_by_name(
    old: tuple[Server, ...], new: tuple[Server, ...], data: st.DataObject
) -> None:
    # Some of the new servers are the old objects, as the model keeps them.
    keep = data.draw(st.booleans())
    kept = {s.name: s for s in old}
    new = tuple(kept[s.name] if keep and kept.get(s.name) == s else s for s in new)
    result = Plan()
    have, want = (Backend("be_x", "x", "http", "roundrobin", None, s) for s in (old, new))
    assert server_changes(have, want, result)
    before, after = {s.name: s for s in old}, {s.name: s for s in new}
    assert result.delete == [("be_x", n) for n in sorted(before.keys() - after.keys())]
    assert result.add == [("be_x", after[n]) for n in sorted(after.keys() - before.keys())]
    assert result.update == [
        ("be_x", before[n], after[n])
        for n in sorted(before.keys() & after.keys())
        if before[n] != after[n]
    ]


@settings(max_examples=150, deadline=None)
@given(EVENTS, st.data())
def test_the_catalogs_change_log_answers_as_a_comparison_would(
    events: list[tuple], data: st.DataObject
) -> None:
    """Between any two of the catalog's snapshots (not only consecutive ones, which is
    what an apply after a debounced burst compares), the change log's answer is the
    answer of comparing every service."""
    feed = Feed()
    snaps = [feed(*event) for event in events]
    i = data.draw(st.integers(0, len(snaps) - 1))
    j = data.draw(st.integers(i, len(snaps) - 1))
    before, after = snaps[i], snaps[j]
    walked = changed_services(dataclasses.replace(before, changes=None), after)
    assert changed_services(before, after) == walked
