"""What `fluster ls` prints: the registry read at a glance, as pure functions to text.

An operator reads `fluster ls` to answer "is anything wrong?", so the problems come
first and in words: a service that routes to nothing, a service served by a fallback
version because its active version has no instance up (`fluster.routing`), a reloader
that has not applied the latest changes ("in step" / "behind by N changes"), records
skipped as invalid. Colour (on a terminal only) marks them; the words carry the meaning
without it. `--json` gives scripts the same facts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime

from fluster.catalog import Service, Snapshot
from fluster.records import Instance, ReloaderStatus
from fluster.routing import Routing, routing

RED, YELLOW, RESET = "\033[31m", "\033[33m", "\033[0m"


@dataclass(frozen=True, slots=True)
class Paint:
    """ANSI colour, or plain text when `on` is False (not a terminal, or NO_COLOR)."""

    on: bool = False

    def red(self, text: str) -> str:
        return f"{RED}{text}{RESET}" if self.on else text

    def yellow(self, text: str) -> str:
        return f"{YELLOW}{text}{RESET}" if self.on else text


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def service_warning(svc: Service, decided: Routing, paint: Paint) -> str | None:
    """One line when the service does not route as its spec says, else None."""
    active = svc.spec.active_version
    if decided.empty and svc.instances:
        what = f"no instance of {active} is up" if active else "no instance is up"
        return paint.red(f"{svc.name}: routes to nothing: {what}")
    if decided.fallback:
        return paint.yellow(
            f"{svc.name}: active version {active} has no instance up; the edge serves "
            f"{decided.fallback} ({len(decided.instances)} up) until it has "
            f"(`fluster rollback {svc.name}` makes that explicit)"
        )
    return None


def lag_text(lag: int | None) -> str:
    if lag == 0:
        return "in step"
    if lag is not None and lag < 0:
        return "ahead of etcd (applied a revision etcd has not reached: restored from a backup?)"
    if lag is None:
        return "behind (by more than etcd still remembers)"
    return f"behind by {lag} change{'s' if lag != 1 else ''}"


def services_text(
    snap: Snapshot,
    live: Mapping[str, ReloaderStatus | None],
    lags: Mapping[str, int | None],
    paint: Paint,
) -> str:
    rows = [["SERVICE", "MODE", "ACTIVE", "CANARY", "UP", "DRAINING", "VERSIONS"]]
    warnings = []
    for name, svc in snap.services.items():
        states = [i.state for i in svc.instances.values()]
        spec = svc.spec
        canary = f"{spec.canary.version} {spec.canary.weight}%" if spec.canary else "-"
        versions = " ".join(f"{v or '(none)'}:{n}" for v, n in svc.versions().items()) or "-"
        rows.append(
            [
                name,
                spec.mode,
                spec.active_version or "(all)",
                canary,
                str(states.count("up")),
                str(states.count("draining")),
                versions,
            ]
        )
        warning = service_warning(svc, routing(svc), paint)
        if warning:
            warnings.append(warning)
    lines = table(rows) if len(rows) > 1 else ["no services registered"]
    lines += ["", *warnings] if warnings else []
    lines += ["", reloaders_text(live, lags, paint)]
    if snap.rejected:
        lines.append(
            paint.yellow(f"{len(snap.rejected)} invalid record(s) skipped")
            + " (see `fluster ls --json`, key 'rejected')"
        )
    return "\n".join(lines)


def reloaders_text(
    live: Mapping[str, ReloaderStatus | None], lags: Mapping[str, int | None], paint: Paint
) -> str:
    if not live:
        return paint.yellow("reloaders: none registered (no edge routes this registry)")
    parts = []
    for name, status in live.items():
        if status is None:
            parts.append(paint.yellow(f"{name} unreadable"))
            continue
        text = f"{name} {lag_text(lags.get(name))}"
        parts.append(text if lags.get(name) == 0 else paint.yellow(text))
    return "reloaders: " + "; ".join(parts)


def age(since: str, now: datetime) -> str:
    """`45s`, `12m`, `3h`, `2d` since an ISO time; `-` when unknown."""
    if not since:
        return "-"
    seconds = max(0, int((now - datetime.fromisoformat(since)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def instances_text(svc: Service, now: datetime, paint: Paint) -> str:
    decided = routing(svc)
    rows = [["INSTANCE", "ADDRESS", "VERSION", "STATE", "NODE", "AGE", "WEIGHT", "ROUTED"]]
    for name, inst in svc.instances.items():
        routed = "no"
        if name in decided.instances:
            routed = "fallback" if decided.fallback else "yes"
        rows.append(
            [
                name,
                inst.address,
                inst.version or "-",
                inst.state,
                inst.node or "-",
                age(inst.since, now),
                str(inst.weight),
                routed,
            ]
        )
    spec = svc.spec
    head = f"{svc.name}: {spec.mode}, active {spec.active_version or '(all)'}"
    if spec.canary:
        head += f", canary {spec.canary.version} {spec.canary.weight}%"
    lines = [head, ""] + (table(rows) if svc.instances else ["no instances registered"])
    warning = service_warning(svc, decided, paint)
    return "\n".join(lines + (["", warning] if warning else []))


def _fields(inst: Instance) -> dict[str, object]:
    """The record as a dict (what `to_json` writes), without a JSON round trip each."""
    out: dict[str, object] = {f.name: getattr(inst, f.name) for f in fields(inst)}
    out["tags"] = dict(inst.tags)
    return out


def ls_json(
    snap: Snapshot,
    live: Mapping[str, ReloaderStatus | None],
    lags: Mapping[str, int | None],
    only: str | None,
) -> dict[str, object]:
    services = {}
    for name, svc in snap.services.items():
        if only and name != only:
            continue
        decided = routing(svc)  # once per service: per instance made --json quadratic
        services[name] = {
            "spec": svc.spec.to_dict(),
            "has_spec": svc.has_spec,
            "versions": svc.versions(),
            "routes_to_nothing": decided.empty,
            "fallback_version": decided.fallback,
            "instances": {
                iname: {**_fields(inst), "routed": iname in decided.instances}
                for iname, inst in svc.instances.items()
            },
        }
    return {
        "revision": snap.revision,
        "services": services,
        "rejected": dict(snap.rejected),
        "reloaders": {
            k: (
                None
                if v is None
                else {
                    "applied_revision": v.applied_revision,
                    "node": v.node,
                    "behind": lags.get(k),
                }
            )
            for k, v in live.items()
        },
    }
