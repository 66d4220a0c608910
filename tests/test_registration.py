"""The sidekick's registration core and its Docker event handling, in-process.

`Registration` runs against a real etcd, but in this process: its decisions (when to
put, retire, drain, put back) are read directly, with the injected clocks (`clock` for
freshness, `wall` for `keep_old_until`), not only through a sidekick's log. The Docker
event handling is fed `DockerEvent` values, which is what `fluster.docker` turns the
engine's stream into: the decisions are tested here; the real engine's stream is
tested in tests/test_sidekick_docker.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from fluster.docker import DockerEvent
from fluster.records import Instance, ServiceSpec
from fluster.runtime import Supervisor
from fluster.store import EtcdSettings, Event, Store, open_store
from sidekick.agent import Sidekick, response_to
from sidekick.hub import Hub
from sidekick.plan import plan_static
from sidekick.registration import Registration
from sidekick.settings import build
from tests.support.etcd import Etcd, eventually

PREFIX = "/fluster/services/web/instances/"
KEY = PREFIX + "n1"
SPEC = "/fluster/services/web/spec"
TTL = 3


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["grpc", "http"])
async def store(etcd: Etcd, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    async with open_store(
        EtcdSettings(endpoints=etcd.endpoint_list, transport=request.param)
    ) as st:
        yield st


@pytest.fixture
async def supervisor() -> AsyncIterator[Supervisor]:
    sup = Supervisor()
    yield sup
    await sup.cancel_all()


def registration(store: Store, version: str = "v1", **kw: object) -> Registration:
    instance = Instance.parse(json.dumps({"host": "127.0.0.1", "port": 8080, "version": version}))
    options: dict[str, object] = {"ttl": TTL, "drain_seconds": 0.0, "healthy": True, **kw}
    return Registration(store, KEY, instance, service="web", name="n1", **options)  # type: ignore[arg-type]


async def registered(
    store: Store, supervisor: Supervisor, first: ServiceSpec | None = None, **kw: object
) -> Registration:
    """A started registration, once it has put its record under `first` (the defaults)."""
    reg = registration(store, **kw)
    reg.start(supervisor)
    reg.observe_spec(first or ServiceSpec())  # nothing is put before the spec is known
    await eventually(lambda: reg.written, what="registered")
    return reg


def v2(state: str = "up") -> str:
    return json.dumps({"host": "127.0.0.1", "port": 8082, "version": "v2", "state": state})


def spec(**fields: object) -> ServiceSpec:
    return ServiceSpec.parse(json.dumps(fields))


async def record(store: Store) -> Instance | None:
    _, kv = await store.get(KEY)
    return None if kv is None else Instance.parse(kv.value)


async def test_freshness_follows_the_injected_clock_and_the_keepalive(
    store: Store, supervisor: Supervisor
) -> None:
    clock = Clock()
    reg = await registered(store, supervisor, clock=clock)
    _, kv = await store.get(KEY)
    assert kv is not None and kv.lease == reg.lease
    assert reg.current
    clock.now += TTL  # a TTL with no word from etcd, as far as the registration knows
    assert not reg.current
    # The next keepalive answer (every TTL/3) is stamped with the clock's new time.
    await eventually(lambda: reg.current, timeout=TTL * 2, what="refreshed by a keepalive")


async def test_retired_when_traffic_moves_away_and_told_once(
    store: Store, supervisor: Supervisor
) -> None:
    retired: list[int] = []
    reg = await registered(store, supervisor, spec(active_version="v1"))
    reg.on_retired = lambda: retired.append(1)
    reg.observe_spec(spec(active_version="v2", history=["v1"]))
    await eventually(lambda: retired, what="retired and deregistered")
    assert reg.retired and reg.lease is None and await record(store) is None
    reg.observe_spec(spec(active_version="v2", history=["v1"]))  # seen again: no news
    assert retired == [1]


async def test_a_version_never_routed_registers_so_that_it_can_be_promoted(
    store: Store, supervisor: Supervisor
) -> None:
    reg = await registered(store, supervisor, spec(active_version="v1"), version="v2")
    assert not reg.retired


async def test_kept_for_a_rollback_until_the_injected_wall_clock_says(
    store: Store, supervisor: Supervisor
) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    wall = [start]
    reg = await registered(store, supervisor, spec(active_version="v1"), wall=lambda: wall[0])
    until = (start + timedelta(seconds=1)).isoformat()
    reg.observe_spec(spec(active_version="v2", history=["v1"], keep_old_until=until))
    assert not reg.retired and reg.written  # kept: a rollback still finds it
    # Its timer (1 s) fires, it asks the wall clock again, which now says past `until`.
    wall[0] = start + timedelta(seconds=2)
    await eventually(lambda: reg.retired, timeout=5, what="retired when the time is up")
    await eventually(lambda: not reg.written, what="deregistered")


async def test_the_version_the_edge_falls_back_to_is_kept_until_the_active_one_has_instances(
    store: Store, supervisor: Supervisor
) -> None:
    """The hub reads every instance record of the service, asks `routing()` which version
    the edge falls back to, and that version's registrations do not retire: else a
    promoted version losing all its instances would leave the service routed to nothing."""
    start = datetime(2030, 1, 1, tzinfo=UTC)
    wall = [start]
    hub = Hub(store, "/fluster", supervisor)
    await store.put(SPEC, json.dumps({"active_version": "v1"}))
    reg = registration(store, wall=lambda: wall[0])
    reg.start(supervisor)
    hub.add(reg)
    await eventually(lambda: reg.written, what="registered")
    watch = hub.watches["web"]

    # Promoted to v2 (kept 1 s), but no v2 instance is up: the edge serves v1.
    until = (start + timedelta(seconds=1)).isoformat()
    promoted = spec(active_version="v2", history=["v1"], keep_old_until=until)
    await store.put(SPEC, promoted.to_json())
    await eventually(lambda: watch.spec == promoted, what="the promotion seen")
    assert watch.fallback == "v1" and reg.held and reg.written
    # Past keep-old (the clock moves and the spec is seen again), beside an invalid v2
    # record (skipped, as the reloader skips it) and a draining one (takes no traffic):
    # still held. The spec is written last, so once it is seen the records were too.
    wall[0] = start + timedelta(seconds=5)
    await store.put(f"{PREFIX}n2", b"{not json")
    await store.put(f"{PREFIX}n3", v2(state="draining"))
    again = spec(active_version="v2", history=["v1"], keep_old_until=start.isoformat())
    await store.put(SPEC, again.to_json())
    await eventually(lambda: watch.spec == again, what="the second spec seen")
    assert set(watch.instances) == {"n1", "n3"}
    assert watch.fallback == "v1" and reg.held and not reg.retired and reg.written

    # A v2 instance up: the active version has instances again, v1 retires now.
    await store.put(f"{PREFIX}n2", v2())
    await eventually(lambda: reg.retired, what="v1 retired once v2 is up")
    assert watch.fallback is None and not reg.held
    await eventually(lambda: not reg.written, what="v1 deregistered")
    await hub.close()


async def test_a_held_retirement_is_released_when_the_fallback_moves(store: Store) -> None:
    """`observe_spec` alone (not started: nothing is written): held while the edge falls
    back to its version, retired as soon as it falls back to another one."""
    reg = registration(store)
    reg.observe_spec(spec(active_version="v1"))
    reg.observe_spec(spec(active_version="v2", history=["v1"]), fallback="v1")
    assert reg.held and not reg.retired
    reg.observe_spec(spec(active_version="v2", history=["v1"]), fallback="v0")
    assert reg.retired and not reg.held


async def test_put_back_after_a_delete_keeping_an_operators_drain(
    store: Store, supervisor: Supervisor
) -> None:
    reg = await registered(store, supervisor)
    inst = await record(store)
    assert inst is not None and reg.lease is not None
    # What the service watch (sidekick/hub.py) would report: an operator's drain...
    draining = inst.replace(state="draining").to_json()
    reg.foreign_put(draining.encode(), await store.put(KEY, draining, lease=reg.lease))
    assert reg.instance.state == "draining"
    # ...then the key deleted (`fluster gc`, `etcdctl del`).
    await store.delete(KEY)
    revision, _ = await store.get(KEY)
    reg.key_deleted(revision)
    back = await eventually(lambda: record(store), what="put back")
    assert back.state == "draining"


async def test_a_lease_revoked_behind_its_back_is_replaced(
    store: Store, supervisor: Supervisor
) -> None:
    reg = await registered(store, supervisor)
    old = reg.lease
    assert old is not None
    await store.revoke(old)
    await eventually(lambda: reg.lease not in (None, old) and reg.written, what="new lease")
    _, kv = await store.get(KEY)
    assert kv is not None and kv.lease == reg.lease


async def test_a_lost_lease_is_replaced_only_after_its_holdoff(
    store: Store, supervisor: Supervisor
) -> None:
    """The hold-off drawn at the loss (here the whole spread) passes before the record is
    put again; it is a timer, not a sleep, so the writer still follows what is wanted."""
    reg = await registered(store, supervisor, reregister_spread=1.5, jitter=lambda lo, hi: hi)
    old = reg.lease
    assert old is not None
    loop = asyncio.get_running_loop()
    await store.revoke(old)
    await eventually(lambda: reg.lease is None, what="the loss noticed")
    noticed, left = loop.time(), reg.holdoff
    assert 0 < left <= 1.5
    reg.set_healthy(False)
    reg.set_healthy(True)  # pokes during the hold-off change nothing
    await eventually(lambda: reg.lease not in (None, old) and reg.written, what="new lease")
    assert loop.time() - noticed >= left
    _, kv = await store.get(KEY)
    assert kv is not None and kv.lease == reg.lease


async def test_close_drains_then_revokes_and_a_dead_container_cuts_the_drain(
    store: Store, supervisor: Supervisor
) -> None:
    seen: list[Event] = []

    async def watch(revision: int) -> None:
        async for batch in store.watch(KEY, revision + 1):
            seen.extend(batch.events)

    reg = await registered(store, supervisor, drain_seconds=60.0)
    watcher = asyncio.create_task(watch(reg.put_revision))
    try:
        closing = asyncio.create_task(reg.close())
        await eventually(
            lambda: [e.type for e in seen] == ["put"], what="the draining record written"
        )
        assert Instance.parse(seen[0].kv.value).state == "draining"
        reg.container_died()  # nothing left to drain: no 60 s wait
        async with asyncio.timeout(10):
            await closing
        await eventually(lambda: [e.type for e in seen] == ["put", "delete"], what="deleted")
        assert reg.lease is None and not reg.written
    finally:
        watcher.cancel()


def test_what_each_container_event_asks_for() -> None:
    def event(action: str, signal: int | None = None) -> DockerEvent:
        return DockerEvent(action, "abc", "web1", {}, signal=signal)

    assert response_to(event("start")) == response_to(event("unpause")) == "track"
    assert response_to(event("kill", 15)) == response_to(event("kill")) == "drain"
    assert response_to(event("kill", 9)) == response_to(event("kill", 2)) == "drain"
    assert response_to(event("kill", 1)) is None  # SIGHUP: a reload, not a stop
    assert response_to(event("kill", 10)) is None  # SIGUSR1: log rotation, say
    for action in ("die", "stop", "destroy", "pause"):
        assert response_to(event(action)) == "drop"
    assert response_to(event("health_status")) == "health"
    assert response_to(event("rename")) is None


async def test_docker_events_drain_and_deregister_a_tracked_container(
    store: Store, supervisor: Supervisor
) -> None:
    argv = ["--service", "web", "--address", "127.0.0.1:8080", "--ttl", str(TTL)]
    s = build([*argv, "--drain-seconds", "0"], {})[0]
    sidekick = Sidekick(s, store, None, "n1", "127.0.0.1", supervisor)
    plan = plan_static(s, "n1")
    sidekick.add("abc", plan, None)
    reg = sidekick.tracked["abc"].reg
    await eventually(lambda: reg.written, what="registered")  # no spec: defaults apply
    await sidekick.on_event(DockerEvent("kill", "abc", plan.name, {}, signal=1))
    assert "abc" in sidekick.tracked, "SIGHUP is a reload"
    await sidekick.on_event(DockerEvent("kill", "abc", plan.name, {}, signal=15))
    assert "abc" not in sidekick.tracked and sidekick.leaving["abc"] is reg
    await eventually(lambda: "abc" not in sidekick.leaving, what="deregistered")
    assert not reg.written
    _, kv = await store.get(reg.key)
    assert kv is None
    await sidekick.shutdown()
