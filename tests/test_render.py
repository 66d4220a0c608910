"""Rendering is pure: snapshot + settings in, text out; no etcd, no HAProxy."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from fluster.catalog import Service, Snapshot
from fluster.records import Instance, ServiceSpec
from reloader.build import build_model
from reloader.model import Model, ModelError, RenderSettings, safe
from reloader.render import Renderer, RenderError, render

SETTINGS = RenderSettings(state_dir=Path("/run/reloader"), http_bind=("127.0.0.1", 8080))


def service(name: str, spec: dict[str, object] | None = None, **instances: Instance) -> Service:
    return Service(
        name,
        spec=ServiceSpec.from_dict(spec or {}),
        has_spec=spec is not None,
        instances=MappingProxyType(dict(sorted(instances.items()))),
    )


def snapshot(*services: Service, revision: int = 7) -> Snapshot:
    return Snapshot(
        revision, MappingProxyType({s.name: s for s in sorted(services, key=lambda s: s.name)})
    )


def inst(port: int, version: str = "", **kw: object) -> Instance:
    return Instance.from_dict({"host": "10.0.0.1", "port": port, "version": version, **kw})


def backend_block(text: str, name: str) -> str:
    return text.split(f"\nbackend {name}\n", 1)[1].split("\n\n", 1)[0]


def test_same_catalog_renders_byte_identical_text() -> None:
    snap = snapshot(service("web", b=inst(2), a=inst(1)), service("api", x=inst(3)))
    # Same content built in another order (and another revision) -> same bytes.
    again = snapshot(service("api", x=inst(3)), service("web", a=inst(1), b=inst(2)), revision=9)
    assert render(snap, SETTINGS) == render(again, SETTINGS)
    text = render(snap, SETTINGS)
    assert text.index("server a 10.0.0.1:1") < text.index("server b 10.0.0.1:2")


def test_defaults_and_sockets() -> None:
    text = render(snapshot(), SETTINGS)
    assert "option idle-close-on-response" in text
    assert "hard-stop-after 60s" in text
    assert "mworker-max-reloads 50" in text
    assert "server-state-file /run/reloader/server-state" in text
    assert "load-server-state-from-file global" in text
    assert "stats socket /run/reloader/admin.sock mode 600 level admin" in text
    assert "bind 127.0.0.1:8080" in text
    assert "frontend stats" not in text
    with_stats = render(snapshot(), RenderSettings(stats_bind=("127.0.0.1", 8404)))
    assert "bind *:80" in with_stats
    assert "bind 127.0.0.1:8404" in with_stats


def test_http_routing_by_host_with_or_without_port_and_by_spec() -> None:
    snap = snapshot(
        service("web", a=inst(1)),
        service("api", {"hosts": ["api.example.com", "::1"], "path_prefix": "/v1"}, a=inst(2)),
        service("docs", {"hosts": ["API.example.com"], "path_prefix": "/v1/docs/"}, a=inst(3)),
    )
    rendered = Renderer().render(snap, RenderSettings(domain="example.net"))
    # One map lookup on the whole Host header (port stripped) + path + "/".
    assert (
        "req.fhdr(host),lower,regsub(:[0-9]+$,),concat(,txn.path,/),"
        "map_beg(/var/lib/reloader/routes.map,no_such_service)"
    ) in rendered.text
    assert "use_backend %[var(txn.backend)] if { var(txn.backend) -m found }" in rendered.text
    assert "acl " not in rendered.text  # no per-service rule to scan
    assert rendered.routes == (
        "[::1]/v1/ be_api\n"  # as an IPv6 literal arrives in Host
        "api.example.com/v1/ be_api\n"
        "api.example.com/v1/docs/ be_docs\n"  # lowercased like the request's Host
        "web.example.net/ be_web\n"
    )


def test_a_host_and_prefix_claimed_twice_is_routed_once() -> None:
    snap = snapshot(
        service("bbb", {"hosts": ["x.example.com"]}, a=inst(1)),
        service("aaa", {"hosts": ["x.example.com"]}, a=inst(2)),
    )
    entries = build_model(snap, SETTINGS).route_entries()
    assert [k for k, _ in entries].count("x.example.com/") == 1


def test_tcp_service_on_its_port_and_port_conflicts_skipped() -> None:
    snap = snapshot(
        service("db", {"mode": "tcp", "port": 5432}, a=inst(1)),
        service("db2", {"mode": "tcp", "port": 5432}, a=inst(2)),
        service("clash", {"mode": "tcp", "port": 8080}, a=inst(3)),
    )
    model = build_model(snap, SETTINGS)
    assert [r.service for r in model.tcp_routes] == ["db"]
    assert len(model.skipped) == 2
    text = render(snap, SETTINGS)
    assert "frontend tcp_db\n    mode tcp\n    bind 127.0.0.1:5432\n" in text
    assert "backend be_db\n    mode tcp\n" in text
    assert "be_db2" not in text


def test_weights_health_checks_and_draining() -> None:
    snap = snapshot(
        service(
            "web",
            {"check": {"path": "/health", "interval_ms": 500}, "balance": "leastconn"},
            a=inst(1, weight=5),
            b=inst(2, state="draining"),
        )
    )
    block = backend_block(render(snap, SETTINGS), "be_web")
    assert "balance leastconn" in block
    assert "option httpchk GET /health" in block
    assert "server a 10.0.0.1:1 weight 5 check inter 500" in block
    assert "server b " not in block


def test_active_version_and_canary_split() -> None:
    spec = {"active_version": "v2", "canary": {"version": "v3", "weight": 10}}
    snap = snapshot(service("web", spec, a=inst(1, "v1"), b=inst(2, "v2"), c=inst(3, "v3")))
    text = render(snap, SETTINGS)
    main, canary = backend_block(text, "be_web"), backend_block(text, "be_web_canary")
    assert "server b " in main and "server a " not in main and "server c " not in main
    assert "server c " in canary and "server b " not in canary
    assert (
        "use_backend be_web_canary if { var(txn.backend) -m str be_web } { rand(100) lt 10 }"
        " { nbsrv(be_web_canary) gt 0 }"
    ) in text
    only_active = snapshot(
        service("web", {"active_version": "v2"}, a=inst(1, "v1"), b=inst(2, "v2"))
    )
    text = render(only_active, SETTINGS)
    assert "be_web_canary" not in text
    assert "server a " not in backend_block(text, "be_web")


def test_structure_ignores_servers_and_routes_only() -> None:
    one = build_model(snapshot(service("web", a=inst(1))), SETTINGS)
    moved = service("web", {"hosts": ["x.example"]}, a=inst(1), b=inst(2))
    two = build_model(snapshot(moved), SETTINGS)
    other = build_model(snapshot(service("web", {"balance": "first"}, a=inst(1))), SETTINGS)
    assert one != two and one.structure() == two.structure()
    assert other.structure() != one.structure()


def test_user_templates_override_file_by_file(tmp_path: Path) -> None:
    (tmp_path / "defaults.j2").write_text("defaults\n    mode http\n    # custom\n")
    text = render(snapshot(service("web", a=inst(1))), SETTINGS, tmp_path)
    assert "# custom" in text
    assert "server a 10.0.0.1:1" in text  # other files still come from the defaults


def test_strict_undefined_and_sandbox_fail_the_render(tmp_path: Path) -> None:
    (tmp_path / "defaults.j2").write_text("{{ no_such_variable }}\n")
    with pytest.raises(RenderError, match="no_such_variable"):
        render(snapshot(), SETTINGS, tmp_path)
    (tmp_path / "defaults.j2").write_text("{{ settings.__class__.__init__.__globals__ }}\n")
    with pytest.raises(RenderError):
        render(snapshot(), SETTINGS, tmp_path)
    (tmp_path / "haproxy.cfg.j2").write_text("{% if %}\n")
    with pytest.raises(RenderError):
        Renderer(tmp_path)


def test_values_are_rechecked_before_rendering() -> None:
    for bad in ("a\nb", "a b", "a#b", 'a"b', "", "x" * 300):
        with pytest.raises(ModelError):
            safe(bad)
    # A record object built past validation still cannot reach the text.
    evil = Instance.__new__(Instance)
    fields = {"host": "1.2.3.4\n  bind :1", "port": 80, "version": "", "weight": 1}
    for name, value in {**fields, "state": "up", "node": "", "tags": {}}.items():
        object.__setattr__(evil, name, value)
    model = build_model(snapshot(service("web", a=evil), service("ok", a=inst(1))), SETTINGS)
    assert [s for b in model.backends for s in b.servers if b.name == "be_web"] == []
    assert [str(s) for s in model.skipped] == [
        "web/a: host name 1.2.3.4\n  bind :1 does not resolve"
    ]
    # A server name (the instance key) is checked again too: the service is left out.
    bad_name = snapshot(service("web", **{"a\n  bind :1": inst(2)}), service("ok", a=inst(1)))
    model = build_model(bad_name, SETTINGS)
    assert [b.name for b in model.backends if b.service] == ["be_ok"]
    assert [(s.service, s.kind) for s in model.skipped] == [("web", "render")]
    assert "bind :1" not in render(bad_name, SETTINGS)


def test_a_framed_render_equals_a_full_render(tmp_path: Path) -> None:
    renderer = Renderer()
    snaps = [
        snapshot(service("web", a=inst(1)), service("api", {"balance": "first"})),
        snapshot(service("web", a=inst(1), b=inst(2)), service("api", {"balance": "first"})),
        snapshot(service("web"), service("api", {"balance": "first"}, a=inst(3, weight=7))),
    ]
    for snap in snaps:
        model = build_model(snap, SETTINGS)
        assert renderer.render_model(model).text == renderer.text(model)
    assert renderer._frame is not None and renderer._frame[1] is not None, "the frame is used"
    # Templates that do more with servers than print their lines: full renders only.
    (tmp_path / "backends.j2").write_text(
        "{% for b in backends %}\nbackend {{ b.name }}\n    # {{ b.servers | length }}\n"
        "{% for s in b.servers %}\n    server {{ s.line }}\n{% endfor %}\n{% endfor %}\n"
    )
    custom = Renderer(tmp_path)
    for snap in snaps:
        model = build_model(snap, SETTINGS)
        assert custom.render_model(model).text == custom.text(model)
    assert custom._frame is not None and custom._frame[1] is None


def test_a_model_built_from_cached_pieces_equals_a_fresh_one() -> None:
    from reloader.build import ServiceCache

    cache = ServiceCache()
    web, api = service("web", a=inst(1)), service("api", {"hosts": ["x.example"]}, a=inst(2))
    db = service("db", {"mode": "tcp", "port": 5432}, a=inst(3))
    steps = [
        snapshot(web, api, db),
        snapshot(service("web", a=inst(1), b=inst(4)), api, db),  # one service changed
        snapshot(api, db),  # one gone
        snapshot(web, api, service("bad", {"hosts": ["x.example"]}, a=inst(5))),  # loser
    ]
    for snap in steps:
        assert build_model(snap, SETTINGS, cache=cache) == build_model(snap, SETTINGS)
    assert set(cache.pieces) <= {"web", "api", "bad"}
    # Another context (settings) starts over.
    other = RenderSettings(state_dir=Path("/x"))
    assert build_model(steps[0], other, cache=cache) == build_model(steps[0], other)


def test_the_routes_map_is_written_again_only_when_the_routes_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A membership change keeps the HTTP routes, so the renderer reuses the last routes
    map text (issue 15); a route change makes it anew, equal to a fresh render."""
    made: list[int] = []
    routes_text = Model.routes_text

    def counting(self: Model) -> str:
        made.append(1)
        return routes_text(self)

    monkeypatch.setattr(Model, "routes_text", counting)
    renderer = Renderer()
    first = renderer.render(
        snapshot(service("web", a=inst(81)), service("api", a=inst(82))), SETTINGS
    )
    grown = renderer.render(
        snapshot(service("web", a=inst(81), b=inst(83)), service("api", a=inst(82))), SETTINGS
    )
    assert len(made) == 1 and grown.routes == first.routes
    assert "be_web" in grown.routes and "server b " in backend_block(grown.text, "be_web")
    spec = {"hosts": ["shop.example"]}
    moved = renderer.render(
        snapshot(service("web", spec, a=inst(81)), service("api", a=inst(82))), SETTINGS
    )
    assert len(made) == 2 and "shop.example/ be_web" in moved.routes
    assert moved.routes == Renderer().render_model(moved.model).routes
