"""The dashboard at `/`: one `Status` rendered as a page an operator can keep open.

Server-rendered HTML (jinja2, autoescaped), inline CSS, an inline SVG chart drawn here,
no JavaScript and nothing fetched from elsewhere: it works offline and behind any proxy.
The page reloads itself every few seconds (a meta refresh), so it is always one
snapshot, never a half-updated one.

What is wrong comes first and in red: a service that routes to nothing, a service left
out of HAProxy, records skipped as invalid, removals held by the blast-radius guard,
HAProxy down, etcd silent. Everything a test or a script needs stays at /status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources

import jinja2

from fluster.channel import parse_endpoint
from reloader.status import LATENCY_WINDOW, ApplyRecord, Status, seconds

REFRESH_SECONDS = 5
PROBE_TIMEOUT = 0.5
PROBE_EVERY = 5.0
CHART_WIDTH, CHART_HEIGHT = 1100, 120

_env = jinja2.Environment(
    loader=jinja2.FunctionLoader(
        lambda name: resources.files("reloader").joinpath("web", name).read_text("utf-8")
    ),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["duration"] = seconds


class EndpointProbe:
    """Whether each etcd endpoint accepts a TCP connection, checked at most every few
    seconds (the gRPC channel balances over them and does not say which one answers)."""

    def __init__(self) -> None:
        self._at = 0.0
        self._result: dict[str, bool] = {}

    async def reachable(self, endpoints: list[str]) -> dict[str, bool]:
        if time.monotonic() - self._at < PROBE_EVERY and set(self._result) == set(endpoints):
            return self._result
        results = await asyncio.gather(*(_connects(e) for e in endpoints))
        self._result, self._at = dict(zip(endpoints, results, strict=True)), time.monotonic()
        return self._result


async def _connects(endpoint: str) -> bool:
    try:
        host, port = parse_endpoint(endpoint)
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
    except (OSError, ValueError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@dataclass(frozen=True, slots=True)
class Chart:
    """Apply latency over the last hour as SVG shapes (coordinates in a 1100x120 box,
    about the pixels it gets on a laptop screen, so its text keeps its size)."""

    points: list[tuple[float, float, str]]  # x, y, tooltip
    path: str
    y_max_ms: float
    width: int = CHART_WIDTH
    height: int = CHART_HEIGHT


def chart(latency: list[tuple[float, float]], now: float) -> Chart:
    w, h, top = CHART_WIDTH, CHART_HEIGHT, 10
    ms = [s * 1000 for _, s in latency]
    y_max = max([10.0, *ms]) * 1.1
    points = []
    for (t, _), v in zip(latency, ms, strict=True):
        x = w * (1 - (now - t) / LATENCY_WINDOW)
        y = h - (h - top) * v / y_max
        when = datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S")
        points.append((round(max(0.0, x), 1), round(y, 1), f"{when} UTC: {v:.1f} ms"))
    path = " ".join(f"{'M' if i == 0 else 'L'}{x},{y}" for i, (x, y, _) in enumerate(points))
    return Chart(points, path, y_max)


def ago(at: str, now: datetime) -> str:
    try:
        then = datetime.fromisoformat(at)
    except ValueError:
        return at
    return f"{seconds(max(0.0, (now - then).total_seconds()))} ago"


def how(entry: ApplyRecord) -> str:
    return {"runtime": "runtime API", "reload": "reload", "failed": "failed"}[entry.kind]


def page(status: Status, reachable: dict[str, bool]) -> str:
    now = datetime.now(UTC)
    problems = [
        n for n, s in status.services.items() if s.routes_to_nothing or s.skipped or s.warning
    ]
    attention = (
        len(problems)
        + len(status.rejected)
        + len(status.rejected_certificates)
        + status.held_removals
        + (0 if status.haproxy_up else 1)
        + (1 if status.sync_age_seconds is None else 0)
    )
    return _env.get_template("dashboard.html.j2").render(
        s=status,
        reachable=reachable,
        refresh=REFRESH_SECONDS,
        now=now,
        generated=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        attention=attention,
        chart=chart(status.apply_latency, now.timestamp()),
        ago=ago,
        how=how,
        problems=problems,
        held=[
            (name, inst, i)
            for name, svc in status.services.items()
            for inst, i in svc.instances.items()
            if i.held
        ],
    )
