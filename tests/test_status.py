"""The typed status: one snapshot, three readers (/status JSON, /metrics, the dashboard).

Pure functions on hand-built snapshots; the real reloader serving them is covered by
tests/test_reloader.py and tests/test_dashboard.py.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from fluster.catalog import Service, Snapshot
from fluster.records import Instance, ServiceSpec
from reloader import dashboard, metrics
from reloader.status import ApplyRecord, ServiceStatus, Stats, Status, describe_change, seconds

# Every key /status had before it was typed: tests, bench and scripts read them.
STATUS_KEYS = {
    "id",
    "node",
    "revision",
    "applied_revision",
    "sync_age_seconds",
    "haproxy_up",
    "haproxy_pid",
    "haproxy_restarts",
    "backends",
    "servers",
    "rejected_records",
    "rejections_total",
    "catalog_resyncs",
    "catalog_reconnects",
    "rejected",
    "held_removals",
    "skipped_services",
    "applies",
    "failures",
    "last_error",
    "recent_applies",
    "services",
}
# Every metric name /metrics had: docs, alert rules, the dashboard and bench read them.
METRIC_NAMES = {
    "reloader_applies_total",
    "reloader_apply_failures_total",
    "reloader_apply_duration_seconds_sum",
    "reloader_apply_duration_seconds_count",
    "reloader_backends",
    "reloader_servers",
    "reloader_rejected_records",
    "reloader_rejections_total",
    "reloader_specs_kept_total",
    "reloader_catalog_resyncs_total",
    "reloader_catalog_reconnects_total",
    "reloader_held_removals",
    "reloader_sync_age_seconds",
    "reloader_revision",
    "reloader_applied_revision",
    "reloader_haproxy_up",
    "reloader_haproxy_restarts_total",
}


def web(*instances: tuple[str, str, str], active: str | None = "v1") -> Service:
    return Service(
        "web",
        ServiceSpec(active_version=active),
        True,
        {
            name: Instance("10.0.0.1", 8000 + i, version, state=state)  # type: ignore[arg-type]
            for i, (name, version, state) in enumerate(instances)
        },
    )


def status(**overrides: object) -> Status:
    svc = web(("a", "v1", "up"), ("b", "v1", "draining"), ("c", "v2", "up"))
    fields: dict[str, object] = {
        "id": "edge-1",
        "node": "n1",
        "revision": 12,
        "applied_revision": 12,
        "sync_age_seconds": 0.4,
        "haproxy_up": True,
        "haproxy_pid": 42,
        "haproxy_restarts": 0,
        "backends": 1,
        "servers": 1,
        "rejections_total": 3,
        "catalog_resyncs": 1,
        "catalog_reconnects": 2,
        "rejected": {"/fluster/services/x/instances/bad": "port: not an integer"},
        "held_removals": 0,
        "removal_holds_total": 0,
        "skipped_services": [],
        "applies": {"noop": 1, "runtime": 4, "reload": 2},
        "failures": {"rejected": 1, "reload": 0, "render": 0},
        "apply_seconds_sum": 0.25,
        "apply_seconds_count": 6,
        "last_error": "",
        "recent_applies": [
            ApplyRecord(
                12, "2026-01-01T00:00:00.000+00:00", "runtime", "web: +1 instance", 0.012, 1
            )
        ],
        "services": {"web": ServiceStatus.of(svc, "localhost")},
    }
    fields.update(overrides)
    return Status(**fields)  # type: ignore[arg-type]


def test_status_json_keeps_every_key_and_says_the_lag_in_words() -> None:
    out = status().to_json()
    assert set(out) >= STATUS_KEYS
    assert out["rejected_records"] == 1
    assert out["lag"] == "in step"
    assert out["services"]["web"]["routed"] == ["a"]
    assert out["services"]["web"]["instances"]["b"]["state"] == "draining"
    assert out["recent_applies"] == [
        {
            "revision": 12,
            "at": "2026-01-01T00:00:00.000+00:00",
            "kind": "runtime",
            "change": "web: +1 instance",
            "seconds": 0.012,
            "servers": 1,
        }
    ]
    behind = status(revision=15, behind_seconds=2.04)
    assert behind.lag == "3 revisions behind for 2.0 s"


def test_metrics_are_prometheus_text_with_every_old_name() -> None:
    text = metrics.exposition(metrics.registry(status)).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert {name for name, _ in samples} >= METRIC_NAMES
    assert samples[("reloader_applies_total", (("kind", "runtime"),))] == 4
    assert samples[("reloader_rejected_records", ())] == 1
    assert samples[("reloader_sync_age_seconds", ())] == 0.4
    assert samples[("reloader_services_routing_to_nothing", ())] == 0
    assert "_created" not in text
    never = metrics.exposition(metrics.registry(lambda: status(sync_age_seconds=None)))
    assert b"reloader_sync_age_seconds -1.0\n" in never


def test_a_service_with_nothing_routed_is_flagged_everywhere() -> None:
    dead = ServiceStatus.of(web(("a", "v1", "draining")), "localhost")
    assert dead.routes_to_nothing
    s = status(services={"web": dead})
    assert s.to_json()["services"]["web"]["routes_to_nothing"] is True
    assert b"reloader_services_routing_to_nothing 1.0" in metrics.exposition(
        metrics.registry(lambda: s)
    )
    html = dashboard.page(s, {})
    assert "routes to nothing" in html
    skipped = ServiceStatus.of(web(), "localhost", skipped="port 80 already used")
    assert not skipped.routes_to_nothing


def test_a_service_served_by_a_fallback_version_says_so_everywhere() -> None:
    svc = ServiceStatus.of(web(("a", "v1", "draining"), ("c", "v2", "up")), "localhost")
    assert not svc.routes_to_nothing and svc.routed == ["c"]
    assert svc.fallback_version == "v2"
    assert svc.warning and "active version v1 has no instance up: serving v2" in svc.warning
    s = status(services={"web": svc})
    out = s.to_json()
    assert out["fallback_services"] == {"web": "v2"}
    assert out["services"]["web"]["warning"] == svc.warning
    text = metrics.exposition(metrics.registry(lambda: s)).decode()
    assert 'reloader_service_fallback{service="web",serving_version="v2"} 1.0' in text
    assert "reloader_fallback_services 1.0" in text
    assert svc.warning in dashboard.page(s, {})


def test_dashboard_escapes_what_etcd_says() -> None:
    hostile = status(rejected={"/fluster/services/<script>": "<img src=x onerror=alert(1)>"})
    html = dashboard.page(hostile, {})
    assert "<script>" not in html.split("</style>", 1)[1]
    assert "&lt;img src=x" in html


def test_describe_change_counts_per_service() -> None:
    one = web(("a", "v1", "up"), ("b", "v1", "up"))
    two = web(("a", "v1", "draining"), ("c", "v1", "up"), ("d", "v1", "up"))
    before = Snapshot(1, {"web": one, "old": Service("old")})
    after = Snapshot(2, {"web": two, "api": Service("api")})
    assert describe_change(before, after) == "api: new; old: removed; web: +2 -1 ~1 instances"
    assert describe_change(after, after) == "no service changed"


def test_stats_know_since_when_the_edge_is_behind() -> None:
    stats = Stats()
    stats.saw(5, now=100.0)
    stats.saw(6, now=101.0)
    stats.saw(6, now=102.0)
    assert stats.behind_since(4) == 100.0
    assert stats.behind_since(5) == 101.0
    assert stats.behind_since(6) is None


def test_durations_carry_units() -> None:
    assert [seconds(v) for v in (0.0123, 2.04, 245, 7380)] == [
        "12 ms",
        "2.0 s",
        "4 min 5 s",
        "2 h 3 min",
    ]


def test_latency_chart_spans_the_last_hour() -> None:
    chart = dashboard.chart([(1000.0, 0.010), (4600.0, 0.050)], now=4600.0)
    (x0, y0, _), (x1, y1, tip) = chart.points
    assert (x0, x1) == (0.0, 1100.0)
    assert y1 < y0  # slower is higher
    assert tip.endswith("50.0 ms")


def test_dashboard_lists_left_out_instances_and_rejected_certificates() -> None:
    s = status(
        skipped_services=[
            {
                "service": "web",
                "kind": "target",
                "reason": "169.254.1.1 is link-local",
                "instance": "w1",
            },
            {"service": "db", "kind": "port", "reason": "port 5432 is in use"},
        ],
        rejected_certificates={"shop.example": "expired 2026-01-01"},
    )
    html = dashboard.page(s, {})
    assert html.count('class="left-out-row"') == 1
    assert 'web/w1</code></td><td class="bad">169.254.1.1 is link-local' in html
    assert "expired 2026-01-01" in html


def test_a_held_removal_says_how_long_it_stays() -> None:
    svc = ServiceStatus.of(
        web(("a", "v1", "up"), ("b", "v1", "up")), "localhost", held={"b": 12.34}
    )
    assert (svc.instances["a"].held, svc.instances["b"].held) == (False, True)
    assert svc.instances["b"].hold_left_seconds == 12.3
    html = dashboard.page(status(services={"web": svc}, held_removals=1), {})
    assert "● held (12.3 s left)" in html
    assert "kept in HAProxy for 12.3 s more, unless it comes back" in html
