"""Where a service's traffic goes: the one routing policy, as a pure function.

The spec names the versions that take traffic (the active one and a canary, or every
version when none is active). When the active version has no instance up but another
version has, routing to nothing would answer every request with 503 (a promoted
version scaled to zero by mistake, or crashed): instead the edge keeps serving the most
recent version that has instances up, until the active version has instances again.
"Most recent": the spec's history first (the previous active version, then the one
before); failing that, the version whose `up` instance was registered last (highest
etcd create revision), then the one with most instances up. `strict` (or the spec's
`strict_active`) routes exactly as the spec says, even to nothing.

Ownership: a host (+ path prefix) belongs to the service that claimed it first, by etcd
create revision. Explicit `hosts` are claimed by the spec (its key's create revision,
which later edits of the spec do not change); the default host `SERVICE.DOMAIN` of a
service without explicit hosts is claimed by the service's oldest record still present.
A later claimant of the same host and path is left out, so a record can only ever
affect its own service.

The reloader renders from this, and `fluster ls`, `promote` and `gc` judge with it, so
what the operator is told is what the edge does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fluster.catalog import Service
from fluster.records import Instance


@dataclass(frozen=True, slots=True)
class Routing:
    """The instances that take a service's traffic, and why."""

    instances: Mapping[str, Instance] = field(default_factory=dict)
    fallback: str | None = None  # the version served because the active one has none up

    @property
    def empty(self) -> bool:
        """Every request to the service fails."""
        return not self.instances


def routing(svc: Service, *, strict: bool = False) -> Routing:
    """The policy above for one service (pure: the service in, the decision out)."""
    routed = svc.routed()
    active = svc.spec.active_version
    strict = strict or svc.spec.strict_active
    if strict or active is None or any(i.version == active for i in routed.values()):
        return Routing(routed)
    up: dict[str, dict[str, Instance]] = {}
    for name, inst in svc.instances.items():
        if inst.state == "up":
            up.setdefault(inst.version, {})[name] = inst
    if not up:
        return Routing()
    # Newest first: the spec's history, then the other versions by their latest
    # registration, then by how many are up.
    newest = {v: max(svc.created.get(n, 0) for n in insts) for v, insts in up.items()}
    others = sorted(
        (v for v in up if v not in svc.spec.history),
        key=lambda v: (-newest[v], -len(up[v]), v),
    )
    version = next(v for v in (*svc.spec.history, *others) if v in up)
    return Routing(up[version], fallback=version)


# -- host ownership ---------------------------------------------------------------------

Claim = tuple[str, str]  # (host, path prefix)
NEW: float = math.inf  # the claim revision of a spec not written yet


def hosts(svc: Service, domain: str) -> tuple[str, ...]:
    """The Host names the service is routed by on the shared HTTP frontend."""
    return svc.spec.hosts or (f"{svc.name}.{domain}",)


def claims(svc: Service, domain: str) -> list[Claim]:
    if svc.spec.mode != "http":
        return []
    return [(host, svc.spec.path_prefix) for host in hosts(svc, domain)]


def claim_revision(svc: Service) -> float:
    """When the service claimed its hosts: lower is older, and older wins."""
    if svc.spec.hosts:
        return svc.spec_created or NEW
    present = [*svc.created.values(), *([svc.spec_created] if svc.spec_created else [])]
    return min((r for r in present if r > 0), default=NEW)


def _by_age(services: Iterable[Service]) -> list[Service]:
    # Two claims of one revision cannot happen in etcd; the name settles a built one.
    return sorted(services, key=lambda s: (claim_revision(s), s.name))


def host_conflicts(services: Iterable[Service], domain: str) -> dict[str, str]:
    """Service name -> why it is left out: a host (+ path) an older service claimed."""
    owner: dict[Claim, str] = {}
    losers: dict[str, str] = {}
    for svc in _by_age(services):
        mine = claims(svc, domain)
        taken = [(c, owner[c]) for c in mine if c in owner]
        if taken:
            (host, path), by = taken[0]
            where = host if path == "/" else f"{host}{path}"
            losers[svc.name] = f"host {where} belongs to service {by}, which claimed it first"
            continue
        owner.update(dict.fromkeys(mine, svc.name))
    return losers


def owner_of(services: Iterable[Service], claim: Claim, domain: str) -> str | None:
    """The service that owns `claim` now, if any."""
    return next((s.name for s in _by_age(services) if claim in claims(s, domain)), None)


__all__ = [
    "Routing",
    "claim_revision",
    "claims",
    "host_conflicts",
    "hosts",
    "owner_of",
    "routing",
]
