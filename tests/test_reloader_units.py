"""Timing and policy logic of the reloader, on an injected clock: no sleeps, no I/O."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import MappingProxyType

import pytest

from fluster.catalog import Service, Snapshot
from fluster.records import Instance, ServiceSpec
from reloader import facts
from reloader.apply import filter_server_state
from reloader.build import build_model
from reloader.debounce import Debouncer
from reloader.facts import Reporter
from reloader.guard import LiveServers, RemovalGuard
from reloader.haproxy import parse_show_proc
from reloader.model import Backend, Model, RenderSettings, Server, with_servers_of
from reloader.render import Renderer
from reloader.runtime_api import plan
from reloader.targets import Resolver
from tests.support.haproxy import HAPROXY


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_debounce_waits_for_quiet() -> None:
    clock = Clock()
    d = Debouncer(quiet=0.05, max_wait=0.5, clock=clock, leading=False)
    assert d.deadline() is None and not d.due()
    d.poke()
    clock.now += 0.04
    assert not d.due()
    d.poke()  # another change restarts the quiet period
    clock.now += 0.04
    assert not d.due()
    clock.now += 0.011
    assert d.due()
    assert not d.pending and not d.due()  # consumed


def test_debounce_max_wait_bounds_a_steady_trickle() -> None:
    clock = Clock()
    d = Debouncer(quiet=0.05, max_wait=0.5, clock=clock, leading=False)
    start = clock.now
    fired = None
    for _ in range(1000):  # a change every 10 ms, forever quiet-less
        d.poke()
        clock.now += 0.01
        if d.due():
            fired = clock.now
            break
    assert fired is not None
    assert 0.5 <= fired - start < 0.52


def test_debounce_applies_a_lone_change_at_once_then_coalesces_what_follows() -> None:
    clock = Clock()
    d = Debouncer(quiet=0.05, max_wait=0.5, clock=clock)
    d.poke()
    assert d.due()  # the stream was quiet already: no quiet period to wait
    clock.now += 0.01
    d.poke()  # closer than the quiet period to the last change: a burst, debounced
    assert not d.due()
    clock.now += 0.03
    d.poke()
    assert not d.due()
    clock.now += 0.05
    assert d.due()
    clock.now += 0.06
    d.poke()  # quiet again since the last change: leading edge again
    assert d.due()


def test_debounce_a_storm_costs_one_apply_more_than_without_the_leading_edge() -> None:
    def applies(leading: bool) -> int:
        clock = Clock()
        d = Debouncer(quiet=0.05, max_wait=0.5, clock=clock, leading=leading)
        count = 0
        for _ in range(1000):  # 1,000 changes in one second
            d.poke()
            clock.now += 0.001
            count += d.due()
        for _ in range(100):
            clock.now += 0.01
            count += d.due()
        return count

    assert applies(leading=False) == 2
    assert applies(leading=True) == 3


async def test_debounce_settled_returns_false_when_nothing_happens() -> None:
    d = Debouncer(quiet=0.0, max_wait=0.0)
    assert await d.settled(0.0) is False
    d.poke()
    assert await d.settled(1.0) is True


def svc(name: str, spec: dict[str, object] | None = None, **instances: Instance) -> Service:
    return Service(
        name,
        spec=ServiceSpec.from_dict(spec or {}),
        instances=MappingProxyType(dict(sorted(instances.items()))),
    )


def snap(*services: Service, revision: int = 1) -> Snapshot:
    return Snapshot(revision, MappingProxyType({s.name: s for s in services}))


def insts(n: int, version: str = "") -> dict[str, Instance]:
    return {f"i{k}": Instance("10.0.0.1", 1000 + k, version=version) for k in range(n)}


def test_guard_holds_mass_removal_then_releases_it() -> None:
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    before = snap(svc("web", **insts(4)))
    after = snap(svc("web", **dict(list(insts(4).items())[:1])))  # 3 of 4 gone: 75 %
    held = guard.filter(after, before)
    assert sorted(held.services["web"].instances) == ["i0", "i1", "i2", "i3"]
    assert guard.next_release() == clock.now + 30
    clock.now += 29
    assert len(guard.filter(after, held).services["web"].instances) == 4
    clock.now += 1
    released = guard.filter(after, held)
    assert sorted(released.services["web"].instances) == ["i0"]
    assert not guard.held


def test_guard_lets_small_removals_through_and_holds_a_vanished_service() -> None:
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    before = snap(svc("web", **insts(4)), svc("api", **insts(2)))
    after = snap(svc("web", **dict(list(insts(4).items())[:2])))  # web: 50 %, api: all gone
    out = guard.filter(after, before)
    assert sorted(out.services["web"].instances) == ["i0", "i1"]
    assert sorted(out.services["api"].instances) == ["i0", "i1"]


def test_guard_ignores_promotion_draining_and_can_be_disabled() -> None:
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    before = snap(svc("web", {"active_version": "v1"}, **insts(4, "v1")))
    promoted = snap(svc("web", {"active_version": "v2"}, **insts(1, "v2")))
    assert guard.filter(promoted, before) is promoted
    draining = {n: i.replace(state="draining") for n, i in insts(4).items()}
    assert (
        guard.filter(snap(svc("web", **draining)), snap(svc("web", **insts(4))))
        .services["web"]
        .instances
        == draining
    )
    off = RemovalGuard(enabled=False, clock=clock)
    empty = snap()
    assert off.filter(empty, before) is empty


def model(*servers: Server, balance: str = "roundrobin") -> Model:
    return Model(
        RenderSettings(), backends=(Backend("be_web", "web", "http", balance, None, servers),)
    )


def test_runtime_plan_add_delete_update_or_reload() -> None:
    a, b = Server("a", "10.0.0.1", 1, 100), Server("b", "10.0.0.2", 2, 100)
    changes = plan(model(a), model(Server("a", "10.0.0.1", 1, 50), b))  # sorted by name
    assert changes is not None
    assert [s.name for _, s in changes.add] == ["b"]
    assert [(o.weight, n.weight) for _, o, n in changes.update] == [(100, 50)]
    assert plan(model(a, b), model(a)).delete == [("be_web", "b")]  # type: ignore[union-attr]
    assert plan(model(a, balance="static-rr"), model(b, balance="static-rr")) is None
    checked = Server("a", "10.0.0.1", 1, 100, 2000)
    assert plan(model(a), model(checked)) is None


def test_show_proc_and_server_state_parsing() -> None:
    text = (
        "#<PID>          <type>          <reloads>       <uptime>        <version>\n"
        "6890            master          3 [failed: 1]   0d00h11m05s     2.6.12\n"
        "# workers\n15563           worker          0               0d00h00m01s     2.6.12\n"
        "# old workers\n14948           worker          1               0d00h00m09s     2.6.12\n"
        "# programs\n\n"
    )
    procs = parse_show_proc(text)
    assert (procs.reloads, procs.failed, procs.workers) == (3, 1, (15563,))
    dump = (
        "1\n# be_id be_name srv_id srv_name srv_addr ...\n"
        "3 be_web 1 a 10.0.0.1 2 0 100 100 3 1 0 2 0 0 0 0 - 1 - 0 0 - - 0\n"
        "3 be_web 2 b 10.0.0.2 2 0 100 100 3 1 0 2 0 0 0 0 - 2 - 0 0 - - 0\n"
    )
    kept = filter_server_state(
        dump, model(Server("a", "10.0.0.1", 1, 100), Server("b", "10.0.0.9", 2, 100))
    )
    assert " a 10.0.0.1 " in kept and " b " not in kept


def test_every_routing_feature_renders_a_config_haproxy_accepts(tmp_path: Path) -> None:
    canary = {"active_version": "v1", "canary": {"version": "v2", "weight": 10}}
    snapshot = snap(
        svc(
            "web",
            {**canary, "check": {"path": "/health?x=1", "interval_ms": 500}},
            a=Instance("10.0.0.1", 80, version="v1"),
            b=Instance("::1", 81, version="v2"),
        ),
        svc(
            "api",
            {
                "hosts": ["api.example.com", "10.1.2.3", "::1"],
                "path_prefix": "/v1",
                "balance": "leastconn",
            },
            a=Instance("api.internal", 80),
        ),
        svc(
            "db",
            {"mode": "tcp", "port": 15432, **canary, "check": {}},
            a=Instance("10.0.0.2", 5432, version="v1"),
            b=Instance("10.0.0.3", 5432, version="v2"),
        ),
        svc("empty", {"balance": "static-rr"}),
    )
    settings = RenderSettings(
        state_dir=tmp_path, http_bind=("127.0.0.1", 18080), stats_bind=("127.0.0.1", 18081)
    )
    path = tmp_path / "haproxy.cfg"
    rendered = Renderer().render(snapshot, settings)
    path.write_text(rendered.text.replace("api.internal", "127.0.0.1"))
    settings.routes_map.write_text(rendered.routes)
    (tmp_path / "server-state").write_text("1\n")
    result = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


def test_with_servers_of_keeps_the_live_structure() -> None:
    a, b = Server("a", "10.0.0.1", 1, 100), Server("b", "10.0.0.2", 2, 100)
    live = model(a)
    target = Model(
        RenderSettings(),
        backends=(
            Backend("be_web", "web", "http", "leastconn", None, (a, b)),
            Backend("be_new", "new", "http", "roundrobin", None, (b,)),
        ),
    )
    partial = with_servers_of(live, target)
    assert [(x.name, x.balance, x.servers) for x in partial.backends] == [
        ("be_web", "roundrobin", (a, b))
    ]


def test_guard_lets_holds_go_once_the_capacity_is_back() -> None:
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    before = snap(svc("web", **insts(4)))
    one = dict(list(insts(4).items())[:1])
    held = guard.filter(snap(svc("web", **one)), before)  # 3 of 4 gone: held
    assert sorted(held.services["web"].instances) == ["i0", "i1", "i2", "i3"]
    clock.now += 1
    # Two replacements came: 3 of the 4 it had is not a drop of over 50 %, so what was
    # held (dead or not) leaves now rather than at the end of the hold.
    back = {**one, "n1": Instance("10.0.0.2", 1), "n2": Instance("10.0.0.2", 2)}
    out = guard.filter(snap(svc("web", **back)), held)
    assert sorted(out.services["web"].instances) == ["i0", "n1", "n2"]
    assert not guard.held


def test_guard_never_holds_a_service_that_keeps_its_capacity() -> None:
    """The issue-22 churn: 4 instances, one replaced per second for a minute, the
    replacement registered either before or after the old record goes (no draining)."""
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    live = dict(insts(4))
    applied = guard.filter(snap(svc("web", **live)), snap(svc("web", **live)))
    for k in range(60):
        clock.now += 1
        old = sorted(live)[0]
        new = {f"r{k:03d}": Instance("10.0.0.3", 2000 + k)}
        steps = ({**live, **new}, {n: i for n, i in {**live, **new}.items() if n != old})
        if k % 2:  # the old record goes first
            steps = ({n: i for n, i in live.items() if n != old}, steps[1])
        for step in steps:
            applied = guard.filter(snap(svc("web", **step)), applied)
            assert applied.services["web"].instances.keys() == step.keys() and not guard.held
        live = dict(steps[1])
    assert guard.holds_started == 0


def test_guard_lowers_its_bar_when_draining_records_go() -> None:
    """Scaling 6 -> 2 through draining is deliberate; a later loss of 1 of the 2 left
    is a drop of 50 % of 2, not of 83 % of 6."""
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    six = insts(6)
    applied = guard.filter(snap(svc("web", **six)), snap(svc("web", **six)))
    draining = {n: i.replace(state="draining") if n >= "i2" else i for n, i in six.items()}
    applied = guard.filter(snap(svc("web", **draining)), applied)
    two = {n: i for n, i in six.items() if n < "i2"}
    clock.now += 1
    applied = guard.filter(snap(svc("web", **two)), applied)
    assert applied.services["web"].instances.keys() == two.keys()
    clock.now += 1
    one = {"i0": six["i0"]}
    assert guard.filter(snap(svc("web", **one)), applied).services["web"].instances == one
    assert not guard.held


def test_a_hold_that_goes_on_hands_out_the_same_service_object() -> None:
    """The model keeps per-service work while a service is the same object: a hold must
    not make every later apply rebuild the held service (issue 22: 30-98 ms a change)."""
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    four = snap(svc("web", **insts(4)), svc("api", **insts(2)))
    gone = snap(svc("web", **dict(list(insts(4).items())[:1])), svc("api", **insts(2)))
    first = guard.filter(gone, four)
    clock.now += 1
    api = svc("api", **insts(3))  # another service changes
    second = guard.filter(snap(gone.services["web"], api), first)
    assert second.services["web"] is first.services["web"]
    assert second.services["api"] is api


def test_guard_counts_removals_that_trickle_in_over_the_window() -> None:
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    all4 = insts(4)
    applied = snap(svc("web", **all4))
    for left in (3, 2):  # one lease expires per apply: 25 %, then 50 %: let through
        clock.now += 1
        applied = guard.filter(snap(svc("web", **dict(list(all4.items())[:left]))), applied)
        assert len(applied.services["web"].instances) == left
    clock.now += 1
    out = guard.filter(snap(svc("web", **dict(list(all4.items())[:1]))), applied)
    # 75 % within the window: held, but only what HAProxy still has (i1); the removals
    # already applied are never put back.
    assert sorted(out.services["web"].instances) == ["i0", "i1"]
    clock.now += 30
    final = guard.filter(snap(svc("web", **dict(list(all4.items())[:1]))), out)
    assert sorted(final.services["web"].instances) == ["i0"]
    clock.now += 1  # a hold that ran out is final: not held again
    again = guard.filter(snap(svc("web", **dict(list(all4.items())[:1]))), final)
    assert sorted(again.services["web"].instances) == ["i0"]
    assert not guard.held


def test_guard_never_puts_back_a_removal_already_applied() -> None:
    """A host agent after a dockerd restart: the dead container's record goes first (one
    of three: applied), then the survivors deregister and register again. The share trips
    the guard, but only servers HAProxy still has are held; the dead one stays out."""
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    three = snap(svc("web", **insts(3)))
    live = {"web": {"i0", "i1", "i2"}}
    survivors = {k: v for k, v in insts(3).items() if k != "i0"}
    first = guard.filter(snap(svc("web", **survivors)), three, live)
    assert sorted(first.services["web"].instances) == ["i1", "i2"] and not guard.held
    live = {"web": {"i1", "i2"}}
    during = guard.filter(snap(svc("web")), first, live)  # the survivors deregistered
    assert sorted(during.services["web"].instances) == ["i1", "i2"]
    assert sorted(guard.held) == [("web", "i1"), ("web", "i2")]
    back = guard.filter(snap(svc("web", **survivors)), during, live)
    assert sorted(back.services["web"].instances) == ["i1", "i2"] and not guard.held


def test_guard_compares_against_the_servers_haproxy_has() -> None:
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    # Four records, but HAProxy has only two of them (say a fallback version's, or two
    # left out as bad targets): losing one of those two is not over 50 %, losing
    # both is.
    # (The same Instance objects throughout, as the catalog keeps an unchanged record's.)
    all4 = insts(4)
    four = snap(svc("web", **all4))
    live = {"web": {"i0", "i1"}}
    one_gone = {k: v for k, v in all4.items() if k != "i0"}
    assert (
        guard.filter(snap(svc("web", **one_gone)), four, live).services["web"].instances.keys()
        == one_gone.keys()
    )
    both_gone = {k: v for k, v in all4.items() if k not in ("i0", "i1")}
    held = guard.filter(snap(svc("web", **both_gone)), four, live)
    assert sorted(held.services["web"].instances) == ["i0", "i1", "i2", "i3"]


def test_guard_does_not_trip_on_a_host_agent_reregistering_its_containers() -> None:
    """R6's sequence: the survivors' old records turn draining (the agent re-registers
    them), then the dead container's record goes. HAProxy then has only the dead one,
    but the draining records show the agent at work: not a mass removal."""
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    names = insts(3)
    draining = {k: v.replace(state="draining") if k != "i0" else v for k, v in names.items()}
    applied = snap(svc("web", **draining))
    survivors = {k: v for k, v in draining.items() if k != "i0"}
    out = guard.filter(snap(svc("web", **survivors)), applied, {"web": {"i0"}})
    assert sorted(out.services["web"].instances) == ["i1", "i2"] and not guard.held


def test_guard_and_reporter_look_only_at_the_services_that_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A membership change in one service costs the guard and the reporter that
    service's work, not the catalog's (issue 15): the catalog keeps an unchanged
    service's object, and they look again only at services whose object changed. A
    hold of another service still runs as before."""
    looked: list[str] = []
    routed = Service.routed

    def counting(self: Service) -> dict[str, Instance]:
        looked.append(self.name)
        return routed(self)

    monkeypatch.setattr(Service, "routed", counting)
    clock = Clock()
    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=clock)
    others = [svc(f"s{k:03d}", **insts(2)) for k in range(50)]
    web, api = svc("web", **insts(4)), svc("api", **insts(2))
    applied = snap(web, api, *others)
    # web loses 3 of 4 (held), api gains one.
    web_now, api_now = svc("web", i0=insts(1)["i0"]), svc("api", **insts(3))
    looked.clear()
    held = guard.filter(snap(web_now, api_now, *others), applied)
    assert sorted(set(looked)) == ["api", "web"]
    assert sorted(held.services["web"].instances) == ["i0", "i1", "i2", "i3"]
    # Next, only api changes again: web's hold runs on, the others are not looked at.
    looked.clear()
    again = guard.filter(snap(web_now, svc("api", **insts(2)), *others), held)
    assert sorted(set(looked)) == ["api", "web"]
    assert sorted(again.services["web"].instances) == ["i0", "i1", "i2", "i3"]
    assert again.services["s007"] is others[7]

    reporter = Reporter(clock=clock)
    resolver = Resolver(clock=clock)
    looked.clear()
    reporter.report(Model(RenderSettings()), again, resolver)
    assert len(looked) == 52
    looked.clear()
    reporter.report(Model(RenderSettings()), snap(web_now, api_now, *others), resolver)
    assert sorted(looked) == ["api", "web"]


def test_fact_finder_works_out_the_hosts_of_changed_services_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hosts to resolve and to check for being this host's own are kept per service
    object (issue 15): after one service changed, only its hosts are looked at again,
    and its new names and addresses are the ones asked about. The resolver is a fake:
    no name lookup may leave the machine from a test."""
    looked: list[str] = []
    hosts_of = facts._hosts_of

    def counting(s: Service, watched: AbstractSet[int]) -> tuple[frozenset[str], frozenset[str]]:
        looked.append(s.name)
        return hosts_of(s, watched)

    monkeypatch.setattr(facts, "_hosts_of", counting)
    asked: list[set[str]] = []
    local_addresses = facts.local_addresses

    def asking(ips: set[str]) -> set[str]:
        asked.append(set(ips))
        return local_addresses(ips)

    monkeypatch.setattr(facts, "local_addresses", asking)
    others = [svc(f"s{k:03d}", **insts(2)) for k in range(20)]
    first = snap(svc("web", a=Instance("127.0.0.1", 80)), *others)
    finder = facts.FactFinder(RenderSettings(http_bind=("127.0.0.1", 80)))
    resolved: list[set[str]] = []

    async def resolve(names: Iterable[str]) -> dict[str, str | None]:
        resolved.append(set(names))
        return dict.fromkeys(resolved[-1])

    monkeypatch.setattr(finder.resolver, "resolve", resolve)
    before = asyncio.run(finder.find(first, None))
    assert len(looked) == 21 and "127.0.0.1" in before.local
    looked.clear()
    # web moves to another address on the watched port: only web is looked at, and the
    # new address is asked about.
    moved = snap(svc("web", a=Instance("10.0.0.9", 80), b=Instance("web-b.invalid", 80)), *others)
    asyncio.run(finder.find(moved, None))
    assert looked == ["web"] and asked[-1] == {"10.0.0.9"}
    assert resolved[-1] == {"web-b.invalid"}


def test_live_servers_are_worked_out_for_the_services_the_guard_asks_about() -> None:
    """The guard's view of what HAProxy has: equal to listing every backend's servers,
    but the guard asks only about the services that changed (issue 15)."""
    others = [svc(f"s{k:03d}", **insts(2)) for k in range(20)]
    applied = snap(svc("web", **insts(4)), *others)
    model = build_model(applied, RenderSettings(state_dir=Path("/run/reloader")))
    live = LiveServers(model.backends)
    eager: dict[str, set[str]] = {}
    for b in model.backends:
        if b.service:
            eager.setdefault(b.service, set()).update(s.name for s in b.servers)
    assert dict(live) == eager and len(live) == 21

    asked: list[str] = []

    class Counting(LiveServers):
        def __getitem__(self, service: str) -> AbstractSet[str]:
            asked.append(service)
            return super().__getitem__(service)

    guard = RemovalGuard(max_removal_pct=50, hold=30, clock=Clock())
    gone = snap(svc("web", i0=insts(1)["i0"]), *others)  # 3 of 4 gone: held
    held = guard.filter(gone, applied, Counting(model.backends))
    assert asked == ["web"]
    assert sorted(held.services["web"].instances) == ["i0", "i1", "i2", "i3"]
