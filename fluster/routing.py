"""Where a service's traffic goes: the one routing policy, as a pure function.

The spec names the versions that take traffic (the active one and a canary, or every
version when none is active). When the active version has no instance up but another
version has, routing to nothing would answer every request with 503 (a promoted
version scaled to zero by mistake, or crashed): instead the edge keeps serving the most
recent version that has instances up, the spec's history first (the previous active
version, then the one before), until the active version has instances again. `strict`
routes exactly as the spec says, even to nothing.

The reloader renders from this, and `fluster ls`, `promote` and `gc` judge with it, so
what the operator is told is what the edge does.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    if routed or strict or svc.spec.active_version is None:
        return Routing(routed)
    up: dict[str, dict[str, Instance]] = {}
    for name, inst in svc.instances.items():
        if inst.state == "up":
            up.setdefault(inst.version, {})[name] = inst
    if not up:
        return Routing()
    # Newest first: the spec's history, then the other versions by how many are up.
    others = sorted((v for v in up if v not in svc.spec.history), key=lambda v: (-len(up[v]), v))
    version = next(v for v in (*svc.spec.history, *others) if v in up)
    return Routing(up[version], fallback=version)


__all__ = ["Routing", "routing"]
