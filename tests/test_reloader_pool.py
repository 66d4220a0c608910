"""Placing a target model on the live backends (reloader/pool.py): pure, no I/O."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from fluster.catalog import Service, Snapshot
from fluster.records import Instance, ServiceSpec
from reloader.build import build_model
from reloader.model import Model, RenderSettings
from reloader.pool import free_slots, place
from reloader.runtime_api import plan

SETTINGS = RenderSettings(state_dir=Path("/run/reloader"), pool_size=2)


def svc(name: str, spec: dict[str, object] | None = None, **instances: Instance) -> Service:
    return Service(
        name,
        spec=ServiceSpec.from_dict(spec or {}),
        has_spec=spec is not None,
        instances=MappingProxyType(dict(sorted(instances.items()))),
    )


def model(*services: Service, settings: RenderSettings = SETTINGS) -> Model:
    snap = Snapshot(1, MappingProxyType({s.name: s for s in services}))
    return build_model(snap, settings)


def inst(port: int, version: str = "") -> Instance:
    return Instance.from_dict({"host": "10.0.0.1", "port": port, "version": version})


def backends(m: Model) -> list[tuple[str, str, int]]:
    return [(b.name, b.service, len(b.servers)) for b in m.backends]


def test_a_new_http_service_takes_a_pool_backend_and_a_map_entry() -> None:
    live = model(svc("web", a=inst(1)))
    assert free_slots(live) == 2
    target = model(svc("web", a=inst(1)), svc("api", a=inst(2), b=inst(3)))
    placed = place(live, target).model
    assert placed is not None
    assert backends(placed) == [("be_web", "web", 1), ("pool_0", "api", 2), ("pool_1", "", 0)]
    changes = plan(live, placed)
    assert changes is not None
    assert [(b, s.name) for b, s in changes.add] == [("pool_0", "a"), ("pool_0", "b")]
    assert changes.route_add == [("api.localhost/", "pool_0")]
    # The same target again: what runs already (no second slot taken).
    assert place(placed, target).model == placed
    # A membership change of the pooled service stays in its slot.
    more = model(svc("web", a=inst(1)), svc("api", a=inst(2)))
    again = place(placed, more).model
    assert again is not None
    changes = plan(placed, again)
    assert changes is not None and changes.delete == [("pool_0", "b")]
    assert not changes.route_add and not changes.route_set


def test_a_removed_service_frees_its_slot_and_unroutes() -> None:
    live = place(model(), model(svc("api", a=inst(2)))).model
    assert live is not None and free_slots(live) == 1
    gone = place(live, model()).model
    assert gone is not None and free_slots(gone) == 2
    changes = plan(live, gone)
    assert changes is not None
    assert changes.route_del == ["api.localhost/"] and changes.delete == [("pool_0", "a")]
    # A canonical backend whose service went away is left empty and unrouted.
    web = model(svc("web", a=inst(1)))
    empty = place(web, model()).model
    assert empty is not None and backends(empty)[0] == ("be_web", "web", 0)
    assert empty.route_entries() == ()


def test_what_needs_a_reload() -> None:
    live = model(svc("web", a=inst(1)))
    # Not a plain HTTP backend: health check, other balance, TCP, canary.
    checked = svc("api", {"check": {"path": "/h"}}, a=inst(2))
    assert place(live, model(svc("web", a=inst(1)), checked)).model is None
    sticky = svc("api", {"balance": "source"}, a=inst(2))
    assert place(live, model(svc("web", a=inst(1)), sticky)).model is None
    tcp = svc("db", {"mode": "tcp", "port": 5432}, a=inst(2))
    assert place(live, model(svc("web", a=inst(1)), tcp)).model is None
    canary = {"active_version": "v1", "canary": {"version": "v2", "weight": 10}}
    split = svc("web", canary, a=inst(1, "v1"), b=inst(2, "v2"))
    assert place(live, model(split)).model is None
    assert place(live, model(svc("web", {"balance": "leastconn"}, a=inst(1)))).model is None
    # A path prefix or another host is only a map entry.
    moved = place(live, model(svc("web", {"hosts": ["x.example"], "path_prefix": "/a"})))
    assert moved.model is not None
    changes = plan(live, moved.model)
    assert changes is not None
    assert changes.route_add == [("x.example/a/", "be_web")]
    assert changes.route_del == ["web.localhost/"]


def test_an_empty_pool_falls_back_to_a_reload() -> None:
    live = model(settings=replace(SETTINGS, pool_size=1))
    one = place(live, model(svc("a", x=inst(1)), settings=replace(SETTINGS, pool_size=1)))
    assert one.model is not None
    two = model(svc("a", x=inst(1)), svc("b", x=inst(2)), settings=replace(SETTINGS, pool_size=1))
    full = place(one.model, two)
    assert full.model is None and full.pool_empty
