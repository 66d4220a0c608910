"""Per-version response counters of services under canary analysis, for the deployer.

While a service's spec says its canary is under analysis (`canary.analysis`), this edge
publishes, about every second, what its HAProxy answered for each of the two versions:
`{prefix}/counters/{service}/{reloader id}`, bound to the reloader's lease (an edge that
dies takes its counters with it). Nothing is read or written for other services, and
the key goes once the analysis ends.

The numbers are HAProxy's own, from `show stat` of the service's two backends (the
active version's `be_{service}`, the canary's `be_{service}_canary`): responses by
class, and the mean response time over the backend's last 1024 responses. HAProxy's
counters start again at zero in each new worker (a reload), so this
keeps running totals of its own that only grow: the deployer subtracts two readings
taken an interval apart, summed over every edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from fluster import keys
from fluster.lease import Lease
from fluster.records import ServiceSpec
from reloader.haproxy import HaproxyError
from reloader.model import backend_name

log = structlog.get_logger("reloader.counters")

INTERVAL = 1.0
CLASSES = ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other")


@dataclass
class Totals:
    """Running totals of one backend on this edge: (responses, 5xx), never going down."""

    responses: int = 0
    errors: int = 0
    # HAProxy's own counters at the last reading; None before the first, which only sets
    # the start (what the backend answered before the analysis began is not counted).
    last: tuple[int, int] | None = None

    def add(self, responses: int, errors: int) -> None:
        if self.last is None:
            self.last = (responses, errors)
            return
        seen_r, seen_e = self.last
        if responses < seen_r or errors < seen_e:  # a new worker: its counters restarted
            seen_r = seen_e = 0
        self.responses += responses - seen_r
        self.errors += errors - seen_e
        self.last = (responses, errors)


@dataclass(frozen=True, slots=True)
class Reading:
    """One backend's BACKEND row: its counters, and HAProxy's mean response time (ms)
    over its last 1024 responses."""

    responses: int
    errors: int
    rtime_ms: int


def parse_stat(csv_text: str) -> dict[str, Reading]:
    """`show stat` CSV -> backend name -> its reading."""
    text = csv_text.lstrip("# ")
    out = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("svname") != "BACKEND":
            continue
        counts = [int(row.get(c) or 0) for c in CLASSES]
        out[row["pxname"]] = Reading(
            sum(counts), int(row.get("hrsp_5xx") or 0), int(row.get("rtime") or 0)
        )
    return out


@dataclass
class Counters:
    """Publishes the counters of the services under analysis; see the module docstring."""

    prefix: str
    reloader_id: str
    lease: Lease
    admin: Callable[[str], Awaitable[str]]  # one runtime API command -> its reply
    specs: Callable[[], Mapping[str, ServiceSpec]]  # the latest snapshot's specs
    totals: dict[tuple[str, str], Totals] = field(default_factory=dict)  # (backend, version)
    published: set[str] = field(default_factory=set)

    def under_analysis(self) -> dict[str, ServiceSpec]:
        return {
            name: spec
            for name, spec in self.specs().items()
            if spec.canary is not None and spec.canary.analysis and spec.active_version
        }

    async def once(self) -> None:
        services = self.under_analysis()
        for key in self.published - {self._key(s) for s in services}:
            self.lease.unset(key)
            self.published.discard(key)
        if not services:
            self.totals.clear()
            return
        stats = parse_stat(await self.admin("show stat -1 2 -1"))
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        for name, spec in services.items():
            assert spec.canary is not None and spec.active_version is not None
            versions = {}
            for version, backend in (
                (spec.active_version, backend_name(name)),
                (spec.canary.version, backend_name(name, canary=True)),
            ):
                totals = self.totals.setdefault((backend, version), Totals())
                reading = stats.get(backend)
                if reading is not None:
                    totals.add(reading.responses, reading.errors)
                versions[version] = {
                    "responses": totals.responses,
                    "errors": totals.errors,
                    "rtime_ms": reading.rtime_ms if reading else 0,
                }
            key = self._key(name)
            self.lease.set(key, json.dumps({"at": at, "versions": versions}, sort_keys=True))
            self.published.add(key)

    def of(self, service: str) -> dict[str, tuple[int, int]]:
        """This edge's counts of the service's versions under analysis: version ->
        (responses, 5xx) since the analysis began; {} when it is not under analysis."""
        spec = self.under_analysis().get(service)
        if spec is None or spec.canary is None or spec.active_version is None:
            return {}
        out = {}
        for version, backend in (
            (spec.active_version, backend_name(service)),
            (spec.canary.version, backend_name(service, canary=True)),
        ):
            totals = self.totals.get((backend, version))
            out[version] = (totals.responses, totals.errors) if totals else (0, 0)
        return out

    def _key(self, service: str) -> str:
        return keys.counters_key(self.prefix, service, self.reloader_id)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(HaproxyError, OSError):  # HAProxy restarting: next time
                await self.once()
            await asyncio.sleep(INTERVAL)  # a sampling period, not synchronisation
