"""A record can only ever affect its own service: the pure decisions, without I/O.

Host ownership and the empty-version fallback (fluster.routing), TCP ports, target
checks and unresolvable names (reloader.model / reloader.targets), and the settings
that guard the stats page. The same rules against a running reloader are in
tests/test_isolation.py.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import MappingProxyType

import pytest

from fluster import routing
from fluster.catalog import Service, Snapshot
from fluster.records import Instance, ServiceSpec
from fluster.settings import SettingsError
from reloader import settings as reloader_settings
from reloader.build import build_model
from reloader.model import RenderSettings
from reloader.render import render
from reloader.targets import (
    HostFacts,
    TargetPolicy,
    etcd_targets,
    parse_networks,
    port_holder,
    target_problem,
)

SETTINGS = RenderSettings(
    state_dir=Path("/run/reloader"),
    http_bind=("127.0.0.1", 8080),
    status_bind=("127.0.0.1", 9090),
    stats_bind=("127.0.0.1", 8404),
    targets=TargetPolicy(etcd=(("127.0.0.1", 2379),)),
)


def service(
    name: str,
    spec: dict[str, object] | None = None,
    *,
    spec_created: int = 0,
    created: dict[str, int] | None = None,
    **instances: Instance,
) -> Service:
    return Service(
        name,
        spec=ServiceSpec.from_dict(spec or {}),
        has_spec=spec is not None,
        instances=MappingProxyType(dict(sorted(instances.items()))),
        spec_created=spec_created,
        created=MappingProxyType(created or dict.fromkeys(instances, 1)),
    )


def snapshot(*services: Service) -> Snapshot:
    return Snapshot(
        7, MappingProxyType({s.name: s for s in sorted(services, key=lambda s: s.name)})
    )


def inst(host: str = "10.0.0.1", port: int = 80, version: str = "", **kw: object) -> Instance:
    return Instance.from_dict({"host": host, "port": port, "version": version, **kw})


def skips(snap: Snapshot, facts: HostFacts | None = None) -> list[tuple[str, str | None, str]]:
    return [(s.service, s.instance, s.kind) for s in build_model(snap, SETTINGS, facts).skipped]


# -- host ownership ---------------------------------------------------------------------


def test_a_membership_change_of_one_service_does_not_judge_the_others_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reloader's memo of host ownership (issue 15): a membership change in one
    service looks at that service only and reuses the last answer; a change that moves
    a claim works the answer out anew, equal to host_conflicts."""
    judged: list[str] = []
    claim_revision = routing.claim_revision

    def counting(svc: Service) -> float:
        judged.append(svc.name)
        return claim_revision(svc)

    monkeypatch.setattr(routing, "claim_revision", counting)
    others = [service(f"s{k:03d}", created={"a": 10 + k}, a=inst(port=80 + k)) for k in range(50)]
    web = service("web", created={"a": 5}, a=inst())
    thief = service("aaa", {"hosts": ["web.localhost"]}, spec_created=9, a=inst(port=81))
    ownership = routing.Ownership()
    first = ownership.conflicts([thief, web, *others], "localhost")
    assert first == routing.host_conflicts([thief, web, *others], "localhost")
    assert set(first) == {"aaa"} and ownership.computed == 1
    # One more instance of web, registered later: its oldest record still claims.
    grown = service("web", created={"a": 5, "b": 60}, a=inst(), b=inst(port=90))
    judged.clear()
    again = ownership.conflicts([thief, grown, *others], "localhost")
    assert (again, judged, ownership.computed) == (first, ["web"], 1)
    # web's last record goes and comes back later than the thief's spec: the thief owns
    # the host now, and the answer says so.
    late = service("web", created={"b": 60}, b=inst(port=90))
    judged.clear()
    moved = ownership.conflicts([thief, late, *others], "localhost")
    assert judged == ["web"] and ownership.computed == 2
    assert moved == routing.host_conflicts([thief, late, *others], "localhost")
    assert set(moved) == {"web"}
    # Another domain: every default host is another claim.
    judged.clear()
    ownership.conflicts([thief, late, *others], "example.org")
    assert len(judged) == 52 and ownership.computed == 3


def test_a_later_spec_cannot_take_a_host_another_service_routes() -> None:
    web = service("web", created={"a": 5}, a=inst())
    thief = service("aaa", {"hosts": ["web.localhost"]}, spec_created=9, a=inst(port=81))
    model = build_model(snapshot(web, thief), SETTINGS)
    assert [r.service for r in model.http_routes] == ["web"]
    (skip,) = model.skipped
    assert skip.service == "aaa" and skip.kind == "host"
    assert "web.localhost belongs to service web" in skip.reason


def test_the_older_claim_wins_whatever_the_names() -> None:
    old = service("zzz", {"hosts": ["shop.example"]}, spec_created=3, a=inst())
    new = service("aaa", {"hosts": ["shop.example", "x.example"]}, spec_created=4, a=inst())
    assert routing.host_conflicts([new, old], "localhost") == {
        "aaa": "host shop.example belongs to service zzz, which claimed it first"
    }
    # Another path prefix on the same host is another claim.
    api = service(
        "aaa", {"hosts": ["shop.example"], "path_prefix": "/api"}, spec_created=4, a=inst()
    )
    assert routing.host_conflicts([api, old], "localhost") == {}
    assert routing.owner_of([old, api], ("shop.example", "/"), "localhost") == "zzz"


# -- TCP ports --------------------------------------------------------------------------


def test_two_tcp_services_on_one_port_the_older_spec_keeps_it() -> None:
    newer = service("aaa", {"mode": "tcp", "port": 5432}, spec_created=20, a=inst())
    older = service("zzz", {"mode": "tcp", "port": 5432}, spec_created=10, a=inst())
    model = build_model(snapshot(newer, older), SETTINGS)
    assert [r.service for r in model.tcp_routes] == ["zzz"]
    assert [(s.service, s.kind) for s in model.skipped] == [("aaa", "port")]
    assert "service zzz" in model.skipped[0].reason


def test_a_tcp_port_of_the_edge_or_held_on_the_host_is_refused() -> None:
    snap = snapshot(
        service("status", {"mode": "tcp", "port": 9090}, spec_created=1, a=inst()),
        service("stats", {"mode": "tcp", "port": 8404}, spec_created=2, a=inst()),
        service("busy", {"mode": "tcp", "port": 2222}, spec_created=3, a=inst()),
        service("fine", {"mode": "tcp", "port": 2223}, spec_created=4, a=inst()),
    )
    facts = HostFacts(busy_ports={2222: "port 2222 is already in use on this host"})
    model = build_model(snap, SETTINGS, facts)
    assert [r.service for r in model.tcp_routes] == ["fine"]
    reasons = {s.service: s.reason for s in model.skipped}
    assert "reloader status page" in reasons["status"]
    assert "stats page" in reasons["stats"]
    assert "already in use" in reasons["busy"]


def test_port_holder_sees_a_listening_socket() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_holder("127.0.0.1", port) == f"port {port} is already in use on this host"
    assert port_holder("127.0.0.1", port) is None


# -- targets ----------------------------------------------------------------------------


def test_self_targets_and_metadata_addresses_are_never_rendered() -> None:
    bad = {
        "loop": inst("127.0.0.1", 8080),  # the HTTP frontend: a request loop
        "status": inst("127.0.0.1", 9090),
        "stats": inst("127.0.0.1", 8404),
        "etcd": inst("127.0.0.1", 2379),
        "any": inst("0.0.0.0", 80),
        "any6": inst("::", 80),
        "metadata": inst("169.254.169.254", 80),
        "ll6": inst("fe80::1", 80),
        "mapped": inst("::ffff:169.254.169.254", 80),
        "tcpself": inst("127.0.0.1", 5432),
    }
    good = inst("127.0.0.1", 3000)
    snap = snapshot(
        service("web", a=good, **bad),
        service("db", {"mode": "tcp", "port": 5432}, spec_created=1, b=inst("127.0.0.1", 5433)),
    )
    model = build_model(snap, SETTINGS)
    (web,) = [b for b in model.backends if b.name == "be_web"]
    assert [s.name for s in web.servers] == ["a"]
    assert sorted(s.instance or "" for s in model.skipped) == sorted(bad)
    assert {s.kind for s in model.skipped} == {"target"}
    text = render(snap, SETTINGS)
    assert "169.254" not in text and "0.0.0.0" not in text


def test_a_local_address_of_the_host_counts_as_the_edge() -> None:
    policy = TargetPolicy(own_ports=((80, "HTTP frontend"),))
    facts = HostFacts(local=frozenset({"10.1.1.1"}))
    assert target_problem("10.1.1.1", 80, policy, facts) is not None
    assert target_problem("10.1.1.2", 80, policy, facts) is None
    assert target_problem("10.1.1.1", 81, policy, facts) is None


def test_allow_and_deny_lists() -> None:
    policy = TargetPolicy(
        allow=parse_networks("10.0.0.0/8, 127.0.0.0/8"), deny=parse_networks("10.9.0.0/16")
    )
    facts = HostFacts()
    assert target_problem("10.1.2.3", 80, policy, facts) is None
    assert target_problem("127.0.0.1", 3000, policy, facts) is None
    assert "--target-deny" in (target_problem("10.9.1.1", 80, policy, facts) or "")
    assert "--target-allow" in (target_problem("192.168.1.1", 80, policy, facts) or "")
    with pytest.raises(ValueError, match="not a CIDR"):
        parse_networks("10.0.0.0/8,nope")
    assert etcd_targets(["https://etcd-1:2379", "127.0.0.1:2379", "http://[::1]:2379/"]) == (
        ("etcd-1", 2379),
        ("127.0.0.1", 2379),
        ("::1", 2379),
    )


def test_an_etcd_endpoint_by_name_is_refused_once_resolved() -> None:
    policy = TargetPolicy(etcd=(("etcd", 2379),))
    facts = HostFacts(addresses={"etcd": "172.18.0.2"})
    assert "etcd endpoint" in (target_problem("172.18.0.2", 2379, policy, facts) or "")
    assert target_problem("172.18.0.3", 2379, policy, facts) is None


def test_an_unresolvable_name_leaves_out_that_instance_only() -> None:
    snap = snapshot(
        service("web", a=inst("127.0.0.1", 3000), b=inst("nosuch.invalid", 80)),
        service("api", c=inst("app.internal", 81)),
    )
    facts = HostFacts(addresses={"nosuch.invalid": None, "app.internal": "10.2.0.5"})
    model = build_model(snap, SETTINGS, facts)
    assert skips(snap, facts) == [("web", "b", "dns")]
    servers = {b.name: [s.address for s in b.servers] for b in model.backends if b.service}
    assert servers == {"be_api": ["10.2.0.5:81"], "be_web": ["127.0.0.1:3000"]}


# -- routes to nothing ------------------------------------------------------------------


def test_fallback_to_the_most_recent_version_with_instances() -> None:
    spec = {"active_version": "v2"}
    v1, v3 = inst(version="v1"), inst(port=81, version="v3")

    def fallback(svc: Service) -> str | None:
        return routing.routing(svc).fallback

    svc = service("web", spec, created={"a": 5, "b": 9}, a=v1, b=v3)
    assert fallback(svc) == "v3"  # registered last
    with_history = service("web", {**spec, "history": ["v1"]}, created={"a": 5, "b": 9}, a=v1, b=v3)
    assert fallback(with_history) == "v1"  # was active before
    assert sorted(routing.routing(with_history).instances) == ["a"]
    strict = service("web", {**spec, "strict_active": True}, a=v1)
    assert fallback(strict) is None and routing.routing(strict).empty
    serving = service("web", spec, a=v1, c=inst(port=82, version="v2"))
    assert fallback(serving) is None
    assert sorted(routing.routing(serving).instances) == ["c"]
    draining_only = service("web", spec, a=inst(version="v1", state="draining"))
    assert fallback(draining_only) is None
    # A canary with instances does not hide an empty active version.
    canary = service(
        "web",
        {**spec, "canary": {"version": "v3", "weight": 10}},
        created={"a": 5, "b": 9},
        a=v1,
        b=v3,
    )
    assert fallback(canary) == "v3"


def test_fallback_fills_the_main_backend_even_with_a_canary() -> None:
    spec = {"active_version": "v2", "canary": {"version": "v3", "weight": 10}}
    snap = snapshot(
        service(
            "web",
            spec,
            created={"a": 1, "b": 2},
            a=inst(version="v1"),
            b=inst(port=81, version="v3"),
        )
    )
    model = build_model(snap, SETTINGS)
    servers = {b.name: [s.name for s in b.servers] for b in model.backends if b.service}
    assert servers["be_web"] == ["b"]  # v3, the newest registration, serves everything


# -- settings ---------------------------------------------------------------------------


def test_stats_off_loopback_requires_auth(tmp_path: Path) -> None:
    env = {"RELOADER_STATE_DIR": str(tmp_path)}
    with pytest.raises(SettingsError, match="--stats-auth"):
        reloader_settings.load(["--stats-bind", "0.0.0.0:8404"], env)
    with pytest.raises(SettingsError, match="--stats-auth"):
        reloader_settings.load(["--stats-bind", "0.0.0.0:8404", "--stats-auth", "a:b#c"], env)
    ok = reloader_settings.load(["--stats-bind", "0.0.0.0:8404", "--stats-auth", "ops:s3cret"], env)
    assert "stats auth ops:s3cret" in render(snapshot(), ok.render)
    assert "s3cret" not in repr(ok.render)
    local = reloader_settings.load(["--stats-bind", "127.0.0.1:8404"], env)
    assert "stats auth" not in render(snapshot(), local.render)
    with pytest.raises(SettingsError, match="--target-allow"):
        reloader_settings.load(["--target-allow", "10.0.0.0/33"], env)
