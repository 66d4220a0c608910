"""`/metrics`: the `Status` snapshot in Prometheus' text format, by prometheus_client.

The reloader's numbers already live in `Status` (counters the pipeline keeps, gauges read
from the catalog and HAProxy at request time), so this is a custom collector that turns
one snapshot into metric families on each scrape, the pattern prometheus_client documents
for exporters, rather than a second set of counters to keep in step. No `_created`
series: a family built per scrape has no creation time to give.

Metric names are part of the interface (docs/OPERATIONS.md, the alert rules in
docs/prometheus/, the Grafana dashboard, bench/adapter.py): add, never rename.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from reloader.model import SKIP_KINDS
from reloader.status import Status

CONTENT_TYPE = CONTENT_TYPE_LATEST


def families(s: Status) -> Iterator[Metric]:
    applies = CounterMetricFamily(
        "reloader_applies_total", "Applied changes by kind.", labels=["kind"]
    )
    for kind, n in s.applies.items():
        applies.add_metric([kind], n)
    yield applies
    failures = CounterMetricFamily(
        "reloader_apply_failures_total", "Changes not applied, by reason.", labels=["reason"]
    )
    for reason, n in s.failures.items():
        failures.add_metric([reason], n)
    yield failures
    yield SummaryMetricFamily(
        "reloader_apply_duration_seconds",
        "Time from settled change to applied.",
        count_value=s.apply_seconds_count,
        sum_value=s.apply_seconds_sum,
    )
    gauges: list[tuple[str, str, float]] = [
        (
            "backends",
            "Service backends in the live config (free pool ones not counted).",
            s.backends,
        ),
        ("servers", "Servers in the live config.", s.servers),
        ("rejected_records", "Records in etcd skipped as invalid.", s.rejected_records),
        ("held_removals", "Removals held by the blast-radius guard now.", s.held_removals),
        ("pool_free", "Empty HTTP backends a new service can take without a reload.", s.pool_free),
        (
            "sync_age_seconds",
            "Seconds since etcd last confirmed our state (-1: never).",
            -1 if s.sync_age_seconds is None else s.sync_age_seconds,
        ),
        ("revision", "etcd revision of the catalog.", s.revision),
        ("applied_revision", "etcd revision last applied.", s.applied_revision),
        ("haproxy_up", "1 when HAProxy runs.", int(s.haproxy_up)),
        ("skipped_services", "Services left out of HAProxy.", len(s.skipped_services)),
        (
            "services_routing_to_nothing",
            "Services HAProxy routes but with no instance to send traffic to.",
            sum(1 for svc in s.services.values() if svc.routes_to_nothing),
        ),
        ("https", "1 when the HTTPS frontend is bound.", int(s.https)),
        (
            "acme_pending_hosts",
            "Hosts whose certificate order failed and waits for a retry (alert when > 0 for long).",
            len(s.acme_retry_at),
        ),
        ("certificates", "Valid certificates loaded from etcd.", len(s.certificates)),
        (
            "certificate_soonest_expiry_seconds",
            "Seconds until the first served certificate expires (+Inf: none).",
            min((c.expires_in_seconds for c in s.certificates.values()), default=float("inf")),
        ),
        (
            "rejected_certificates",
            "Certificate records in etcd skipped as invalid.",
            len(s.rejected_certificates),
        ),
    ]
    for name, help_, value in gauges:
        yield GaugeMetricFamily(f"reloader_{name}", help_, value=value)
    expiry = GaugeMetricFamily(
        "reloader_certificate_expiry_seconds",
        "Seconds until each served certificate expires (alert well before 0).",
        labels=["cert"],
    )
    for name, cert in s.certificates.items():
        expiry.add_metric([name], cert.expires_in_seconds)
    yield expiry
    skipped = GaugeMetricFamily(
        "reloader_skipped",
        "Services or instances left out of HAProxy now, by kind of reason.",
        labels=["kind"],
    )
    now: dict[str, int] = dict.fromkeys(SKIP_KINDS, 0)
    for skip in s.skipped_services:
        now[skip["kind"]] = now.get(skip["kind"], 0) + 1
    for skip_kind, n in sorted(now.items()):
        skipped.add_metric([skip_kind], n)
    yield skipped
    skips = CounterMetricFamily(
        "reloader_skips",
        "Times a service or instance was left out of HAProxy, by kind of reason.",
        labels=["kind"],
    )
    for skip_kind in sorted({*SKIP_KINDS, *s.skips_total}):
        skips.add_metric([skip_kind], s.skips_total.get(skip_kind, 0))
    yield skips
    fallback = GaugeMetricFamily(
        "reloader_service_fallback",
        "1 while a service's active version has no instance up and another version serves.",
        labels=["service", "serving_version"],
    )
    for service, version in sorted(s.fallback_services.items()):
        fallback.add_metric([service, version], 1)
    yield fallback
    yield GaugeMetricFamily(
        "reloader_fallback_services",
        "Services served by another version because the active one has no instance up.",
        value=len(s.fallback_services),
    )
    counters: list[tuple[str, str, float]] = [
        (
            "rejections_total",
            "Invalid record writes seen (each bad put counts once).",
            s.rejections_total,
        ),
        (
            "specs_kept_total",
            "Invalid spec writes answered by keeping the service's last good spec.",
            s.specs_kept_total,
        ),
        (
            "catalog_resyncs_total",
            "Full relists of etcd after its history was compacted.",
            s.catalog_resyncs,
        ),
        (
            "catalog_reconnects_total",
            "Watch streams resumed after an error (member lost, no leader, timeout).",
            s.catalog_reconnects,
        ),
        ("haproxy_restarts_total", "HAProxy restarts after it died.", s.haproxy_restarts),
        (
            "removal_holds_total",
            "Times the blast-radius guard started holding a service's removals (a capacity drop).",
            s.removal_holds_total,
        ),
        ("acme_orders_total", "Certificates obtained by ACME.", s.acme_orders),
        ("acme_failures_total", "ACME orders that failed.", s.acme_failures),
        (
            "tls_applies_total",
            "Certificate or HTTPS policy changes made through the runtime API.",
            s.tls_applies,
        ),
        (
            "tls_failures_total",
            "Certificate changes HAProxy refused at runtime (a reload applied them).",
            s.tls_failures,
        ),
        (
            "pool_fallbacks_total",
            "New HTTP services that found the backend pool empty and took a reload.",
            s.pool_fallbacks,
        ),
        (
            "admin_connects_total",
            "Connections to HAProxy's admin socket for runtime changes (kept between "
            "changes; a new one after each reload or error).",
            s.admin_connects,
        ),
    ]
    for name, help_, value in counters:
        yield CounterMetricFamily(f"reloader_{name}", help_, value=value)


class _Collector(Collector):
    def __init__(self, status: Callable[[], Status]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        return families(self.status())


def registry(status: Callable[[], Status]) -> CollectorRegistry:
    """A registry of its own (not the process-global one): two reloaders in one process,
    as in tests, do not collide, and nothing else leaks into the exposition."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(status))
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
