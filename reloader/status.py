"""What the reloader knows about itself, as one typed value.

`status_of(reloader)` builds a `Status` on each request; `/status` serialises it
(`Status.to_json`), `/metrics` exposes it (reloader/metrics.py) and the dashboard renders
it (reloader/dashboard.py). All three read the same fields, so a field added here (with a
default, so nothing else has to change) is one edit away from each of them, and a typo
in a reader is a type error instead of a KeyError at request time.

`Stats` is the mutable side: counters and the apply history the pipeline appends to.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from fluster.catalog import Service, Snapshot, changed_services
from fluster.certs import Certificate
from fluster.routing import routing

if TYPE_CHECKING:
    from reloader.app import Reloader
    from reloader.model import Model

ApplyKind = Literal["noop", "runtime", "reload"]
FailureReason = Literal["rejected", "reload", "render"]

RECENT_APPLIES = 20  # rows in /status and on the dashboard
LATENCY_WINDOW = 3600.0  # seconds of apply latency the dashboard charts
LATENCY_POINTS = 2000  # at most this many kept, oldest dropped first


@dataclass(frozen=True, slots=True)
class ApplyRecord:
    """One apply that changed something, or one that failed."""

    revision: int
    at: str  # ISO 8601, UTC, milliseconds
    kind: Literal["runtime", "reload", "failed"]
    change: str = ""  # what changed, in words ("web: +1 -2 instances")
    seconds: float | None = None  # settled change -> applied; None when it failed
    servers: int | None = None  # servers in the config afterwards
    reason: FailureReason | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Stats:
    """Counters and history, appended to by the pipeline; read through `Status`."""

    applies: dict[ApplyKind, int] = field(
        default_factory=lambda: {"noop": 0, "runtime": 0, "reload": 0}
    )
    failures: dict[FailureReason, int] = field(
        default_factory=lambda: {"rejected": 0, "reload": 0, "render": 0}
    )
    apply_seconds_sum: float = 0.0
    apply_seconds_count: int = 0
    last_error: str = ""
    recent: deque[ApplyRecord] = field(default_factory=lambda: deque(maxlen=RECENT_APPLIES))
    # (unix time, seconds) of each apply that changed HAProxy, for the latency chart.
    latency: deque[tuple[float, float]] = field(
        default_factory=lambda: deque(maxlen=LATENCY_POINTS)
    )
    # (revision, monotonic time first seen), to say how long the edge has been behind.
    seen: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=256))

    def record(self, entry: ApplyRecord) -> None:
        self.recent.appendleft(entry)
        if entry.seconds is not None:
            self.latency.append((time.time(), entry.seconds))

    def changed(self, entry: ApplyRecord, seconds: float, model: Model) -> None:
        """An apply changed what HAProxy runs (`entry` without its figures)."""
        self.apply_seconds_sum += seconds
        self.apply_seconds_count += 1
        self.record(replace(entry, seconds=round(seconds, 4), servers=model.server_count))

    def late_rejection(self, error: str) -> None:
        """The file written after runtime changes failed its check (they were undone)."""
        self.failures["rejected"] += 1
        self.last_error = f"rejected after runtime changes (undone): {error}"[:2000]

    def failed(self, entry: ApplyRecord, reason: FailureReason, error: Exception) -> None:
        """An apply failed for `reason`: the live config keeps serving."""
        self.failures[reason] += 1
        self.last_error = f"{reason}: {error}"[:2000]
        self.record(replace(entry, reason=reason, error=str(error)[:500]))

    def saw(self, revision: int, now: float | None = None) -> None:
        """The catalog reached `revision` (called for every snapshot it hands over)."""
        if not self.seen or self.seen[-1][0] < revision:
            self.seen.append((revision, time.monotonic() if now is None else now))

    def behind_since(self, applied: int) -> float | None:
        """Monotonic time the oldest revision newer than `applied` was seen, if any."""
        return next((at for rev, at in self.seen if rev > applied), None)


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    address: str
    version: str
    state: str  # the record's state: up, draining, down
    weight: int
    node: str = ""
    routed: bool = False  # HAProxy sends it traffic
    held: bool = False  # gone from etcd, kept in HAProxy by the removal guard
    hold_left_seconds: float | None = None  # until the guard lets the removal through
    skipped: str | None = None  # why HAProxy does not get it (bad target, no DNS answer)


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    active_version: str | None
    mode: str
    instances: Mapping[str, InstanceStatus]
    routed: list[str]  # names of the instances HAProxy routes to
    hosts: list[str] = field(default_factory=list)
    path_prefix: str = "/"
    port: int | None = None
    canary_version: str | None = None
    canary_weight: int = 0  # percent of requests to the canary version
    # Under canary analysis: this edge's counts since it began, version -> [responses, 5xx]
    analysis: Mapping[str, tuple[int, int]] | None = None
    skipped: str | None = None  # why the service is left out of HAProxy, if it is
    # The version served while the active one has no instance up (fluster.routing), and
    # the warning that says so; both None when the active version serves.
    fallback_version: str | None = None
    warning: str | None = None

    @classmethod
    def of(
        cls,
        svc: Service,
        domain: str,
        held: Mapping[str, float] | None = None,
        skipped: str | None = None,
        left_out: Mapping[str, str] | None = None,
        analysis: Mapping[str, tuple[int, int]] | None = None,
    ) -> ServiceStatus:
        """`held`: instance -> seconds its hold has left (reloader.guard); `left_out`:
        instance -> why HAProxy does not get it (reloader.model)."""
        left_out, held = left_out or {}, held or {}
        decided = routing(svc)
        spec = svc.spec
        routed = {n for n in decided.instances if n not in left_out}
        instances = {
            name: InstanceStatus(
                address=inst.address,
                version=inst.version,
                state=inst.state,
                weight=inst.weight,
                node=inst.node,
                routed=name in routed,
                held=name in held,
                hold_left_seconds=None if name not in held else round(max(0.0, held[name]), 1),
                skipped=left_out.get(name),
            )
            for name, inst in svc.instances.items()
        }
        return cls(
            active_version=spec.active_version,
            mode=spec.mode,
            instances=instances,
            routed=sorted(routed),
            hosts=list(spec.hosts or (f"{svc.name}.{domain}",)) if spec.mode == "http" else [],
            path_prefix=spec.path_prefix,
            port=spec.port if spec.mode == "tcp" else None,
            canary_version=spec.canary.version if spec.canary else None,
            canary_weight=spec.canary.weight if spec.canary else 0,
            analysis=analysis or None,
            skipped=skipped,
            fallback_version=decided.fallback,
            warning=None
            if decided.fallback is None
            else f"active version {spec.active_version} has no instance up: serving "
            f"{decided.fallback} until it has (strict_active: true routes nothing instead)",
        )

    @property
    def routes_to_nothing(self) -> bool:
        """Not skipped, yet no instance takes traffic: every request to it fails."""
        return self.skipped is None and not self.routed


@dataclass(frozen=True, slots=True)
class CertStatus:
    """A certificate the edge serves (private key not included, ever)."""

    names: list[str]
    issuer: str
    not_after: str  # ISO 8601
    expires_in_seconds: float
    fingerprint_sha256: str

    @classmethod
    def of(cls, cert: Certificate, now: float | None = None) -> CertStatus:
        now = time.time() if now is None else now
        return cls(
            names=list(cert.names),
            issuer=cert.issuer,
            not_after=cert.not_after.isoformat(),
            expires_in_seconds=round(cert.not_after.timestamp() - now, 1),
            fingerprint_sha256=cert.fingerprint,
        )


@dataclass(frozen=True, slots=True)
class Status:
    """The reloader at one moment. Field names are the `/status` JSON keys."""

    id: str
    node: str
    revision: int  # the catalog's etcd revision
    applied_revision: int  # the revision HAProxy serves
    sync_age_seconds: float | None  # since etcd last confirmed our state; None: never
    haproxy_up: bool
    haproxy_pid: int | None
    haproxy_restarts: int
    backends: int
    servers: int
    rejections_total: int
    catalog_resyncs: int
    catalog_reconnects: int
    rejected: Mapping[str, str]  # etcd key -> why the record was skipped
    held_removals: int
    removal_holds_total: int
    # Services (or single instances) left out of HAProxy: service, kind, reason, instance.
    skipped_services: list[dict[str, str]]
    applies: Mapping[ApplyKind, int]
    failures: Mapping[FailureReason, int]
    apply_seconds_sum: float
    apply_seconds_count: int
    last_error: str
    recent_applies: list[ApplyRecord]  # newest first
    services: Mapping[str, ServiceStatus]
    sync_max_age_seconds: float = 60.0  # older than this, /healthz fails
    behind_seconds: float | None = None  # how long applied_revision has lagged revision
    etcd_endpoints: list[str] = field(default_factory=list)
    apply_latency: list[tuple[float, float]] = field(default_factory=list)  # (unix time, s)
    https: bool = False  # the HTTPS frontend is bound
    certificates: Mapping[str, CertStatus] = field(default_factory=dict)  # by record name
    rejected_certificates: Mapping[str, str] = field(default_factory=dict)  # name -> why
    tls_applies: int = 0  # certificate/policy changes made through the runtime API
    tls_failures: int = 0  # such changes HAProxy refused (a reload applied them instead)
    acme: bool = False  # this edge obtains certificates by ACME
    acme_orders: int = 0  # certificates it obtained
    acme_failures: int = 0  # orders that failed (each retried with backoff)
    acme_last_error: str = ""
    acme_retry_at: Mapping[str, float] = field(default_factory=dict)  # host -> unix time
    skips_total: Mapping[str, int] = field(default_factory=dict)  # kind -> times left out
    pool_free: int = 0  # empty HTTP backends a new service can take without a reload
    pool_fallbacks: int = 0  # new HTTP services that found the pool empty and reloaded
    admin_connects: int = 0  # admin socket connections the runtime API opened
    specs_kept_total: int = 0  # invalid specs answered by keeping the service's last good one

    @property
    def fallback_services(self) -> dict[str, str]:
        """Service -> the version served while its active version has no instance up."""
        return {n: s.fallback_version for n, s in self.services.items() if s.fallback_version}

    @property
    def rejected_records(self) -> int:
        return len(self.rejected)

    @property
    def lag(self) -> str:
        """The applied revision against etcd's, in words."""
        behind = self.revision - self.applied_revision
        if behind <= 0:
            return "in step"
        since = "" if self.behind_seconds is None else f" for {seconds(self.behind_seconds)}"
        return f"{behind} revision{'s' if behind != 1 else ''} behind{since}"

    def to_json(self) -> dict[str, Any]:
        out = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name not in ("recent_applies", "services", "apply_latency")
        }
        out["rejected"] = dict(self.rejected)
        out["applies"] = dict(self.applies)
        out["failures"] = dict(self.failures)
        out["rejected_records"] = self.rejected_records
        out["skips_total"] = dict(self.skips_total)
        out["fallback_services"] = self.fallback_services
        out["lag"] = self.lag
        out["recent_applies"] = [a.to_json() for a in self.recent_applies]
        out["certificates"] = {name: asdict(c) for name, c in self.certificates.items()}
        out["rejected_certificates"] = dict(self.rejected_certificates)
        out["services"] = {
            name: {**asdict(svc), "routes_to_nothing": svc.routes_to_nothing}
            for name, svc in self.services.items()
        }
        return out


def seconds(value: float) -> str:
    """A duration for people: 850 ms, 2.1 s, 4 min 5 s, 2 h 3 min."""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60)} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60)} min"


def describe_change(before: Snapshot | None, after: Snapshot) -> str:
    """What differs between two snapshots, per service, in a few words."""
    old = before.services if before is not None else {}
    parts: list[str] = []
    for name in sorted(changed_services(before, after)):
        a, b = old.get(name), after.services.get(name)
        if a is None:
            parts.append(f"{name}: new")
            continue
        if b is None:
            parts.append(f"{name}: removed")
            continue
        words: list[str] = []
        if a.spec != b.spec:
            words.append("spec")
        before_, after_ = a.instances, b.instances
        kept = changed = 0
        for i, inst in after_.items():  # one walk: a service may have thousands
            old_inst = before_.get(i)
            if old_inst is not None:
                kept += 1
                # The catalog keeps an unchanged instance's object.
                changed += old_inst is not inst and old_inst != inst
        added, removed = len(after_) - kept, len(before_) - kept
        counts = " ".join(
            f"{sign}{n}" for sign, n in (("+", added), ("-", removed), ("~", changed)) if n
        )
        if counts:
            words.append(f"{counts} instance{'s' if added + removed + changed != 1 else ''}")
        if words:
            parts.append(f"{name}: {', '.join(words)}")
    text = "; ".join(parts[:4])
    if len(parts) > 4:
        text += f"; and {len(parts) - 4} more"
    return text or "no service changed"


def status_of(r: Reloader) -> Status:
    """What `r` knows about itself now; built on each request."""
    snap = r.applied or Snapshot()
    running = r.applier.running
    age = r.catalog.sync_age()
    # The last render's, even when it changed nothing HAProxy runs (a noop apply).
    skipped = sorted(r.reporter.skips, key=lambda s: (s.service, s.instance or "", s.kind))
    why_skipped = {s.service: s.reason for s in skipped if s.instance is None}
    left_out = {(s.service, s.instance): s.reason for s in skipped if s.instance}
    held = list(r.guard.held)
    behind_since = r.stats.behind_since(snap.revision)
    return Status(
        id=r.settings.reloader_id,
        node=r.settings.node,
        revision=r.catalog.revision,
        applied_revision=snap.revision,
        sync_age_seconds=None if age is None else round(age, 3),
        haproxy_up=r.haproxy.up,
        haproxy_pid=r.haproxy.proc.pid if r.haproxy.proc else None,
        haproxy_restarts=r.haproxy.restarts,
        backends=sum(1 for b in running.backends if b.service) if running else 0,
        servers=running.server_count if running else 0,
        rejections_total=r.catalog.rejected_total,
        specs_kept_total=r.catalog.specs_kept_total,
        catalog_resyncs=r.catalog.resyncs,
        catalog_reconnects=r.catalog.reconnects,
        rejected=dict(r.catalog.snapshot.rejected),
        https=running is not None and running.https_bind is not None,
        certificates={name: CertStatus.of(cert) for name, cert in r.certs.certs.items()},
        rejected_certificates=dict(r.certs.rejected),
        tls_applies=r.tls.applies,
        tls_failures=r.tls.failures,
        acme=r.acme is not None,
        acme_orders=r.acme.stats.orders if r.acme else 0,
        acme_failures=r.acme.stats.failures if r.acme else 0,
        acme_last_error=r.acme.stats.last_error if r.acme else "",
        acme_retry_at=dict(r.acme.stats.retry_at) if r.acme else {},
        held_removals=len(held),
        removal_holds_total=r.guard.holds_started,
        skipped_services=[s.as_dict() for s in skipped],
        skips_total=dict(r.reporter.counts),
        pool_free=r.applier.pool_free,
        pool_fallbacks=r.applier.pool_fallbacks,
        admin_connects=r.applier.runtime.connects,
        applies=dict(r.stats.applies),
        failures=dict(r.stats.failures),
        apply_seconds_sum=r.stats.apply_seconds_sum,
        apply_seconds_count=r.stats.apply_seconds_count,
        last_error=r.stats.last_error,
        recent_applies=list(r.stats.recent),
        services={
            name: ServiceStatus.of(
                svc,
                r.settings.render.domain,
                held={
                    i: r.guard.hold - (r.guard.clock() - h.since)
                    for (s, i), h in r.guard.held.items()
                    if s == name
                },
                skipped=why_skipped.get(name),
                left_out={i: r for (s, i), r in left_out.items() if s == name and i},
                analysis=r.counters.of(name),
            )
            for name, svc in snap.services.items()
        },
        sync_max_age_seconds=r.settings.sync_max_age,
        behind_seconds=None if behind_since is None else time.monotonic() - behind_since,
        etcd_endpoints=list(r.settings.etcd.endpoints),
        apply_latency=[(t, s) for t, s in r.stats.latency if t > time.time() - LATENCY_WINDOW],
    )
