"""The reloader's own HTTP face: /healthz, /metrics, /status and a small HTML page.

/healthz is what a Docker HEALTHCHECK or an orchestrator probes: 503 when HAProxy is
down or our view of etcd is older than the threshold (a reloader that lost etcd keeps
serving the last config, but should be looked at). /metrics is Prometheus text,
written by hand: a dozen series do not need a client library.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

APPLY_KINDS = ("noop", "runtime", "reload")
FAILURES = ("rejected", "reload", "render")


@dataclass
class Stats:
    applies: dict[str, int] = field(default_factory=lambda: {"noop": 0, "runtime": 0, "reload": 0})
    failures: dict[str, int] = field(
        default_factory=lambda: {"rejected": 0, "reload": 0, "render": 0}
    )
    apply_seconds_sum: float = 0.0
    apply_seconds_count: int = 0
    last_apply_seconds: float = 0.0
    recent: list[dict[str, Any]] = field(default_factory=list)  # newest first
    last_error: str = ""

    def record(self, entry: dict[str, Any]) -> None:
        self.recent.insert(0, entry)
        del self.recent[20:]


def metrics_text(status: dict[str, Any], stats: Stats) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: dict[str, float]) -> None:
        lines.append(f"# HELP reloader_{name} {help_}")
        lines.append(f"# TYPE reloader_{name} {kind}")
        for labels, value in samples.items():
            lines.append(f"reloader_{name}{labels} {value:g}")

    metric(
        "applies_total",
        "counter",
        "Applied changes by kind.",
        {f'{{kind="{k}"}}': v for k, v in stats.applies.items()},
    )
    metric(
        "apply_failures_total",
        "counter",
        "Changes not applied, by reason.",
        {f'{{reason="{k}"}}': v for k, v in stats.failures.items()},
    )
    metric(
        "apply_duration_seconds",
        "summary",
        "Time from settled change to applied.",
        {"_sum": stats.apply_seconds_sum, "_count": stats.apply_seconds_count},
    )
    metric("backends", "gauge", "Backends in the live config.", {"": status["backends"]})
    metric("servers", "gauge", "Servers in the live config.", {"": status["servers"]})
    metric(
        "rejected_records",
        "gauge",
        "Records in etcd skipped as invalid.",
        {"": status["rejected_records"]},
    )
    metric(
        "rejections_total",
        "counter",
        "Invalid record writes seen (each bad put counts once).",
        {"": status["rejections_total"]},
    )
    metric(
        "catalog_resyncs_total",
        "counter",
        "Full relists of etcd after its history was compacted.",
        {"": status["catalog_resyncs"]},
    )
    metric(
        "catalog_reconnects_total",
        "counter",
        "Watch streams resumed after an error (member lost, no leader, timeout).",
        {"": status["catalog_reconnects"]},
    )
    metric(
        "held_removals",
        "gauge",
        "Removals held by the blast-radius guard.",
        {"": status["held_removals"]},
    )
    age = status["sync_age_seconds"]
    metric(
        "sync_age_seconds",
        "gauge",
        "Seconds since etcd last confirmed our state.",
        {"": -1 if age is None else age},
    )
    metric("revision", "gauge", "etcd revision of the catalog.", {"": status["revision"]})
    metric(
        "applied_revision", "gauge", "etcd revision last applied.", {"": status["applied_revision"]}
    )
    metric("haproxy_up", "gauge", "1 when HAProxy runs.", {"": int(status["haproxy_up"])})
    metric(
        "haproxy_restarts_total",
        "counter",
        "HAProxy restarts after it died.",
        {"": status["haproxy_restarts"]},
    )
    return "\n".join(lines) + "\n"


def html_page(status: dict[str, Any]) -> str:
    esc = html.escape
    rows = []
    for name, svc in status["services"].items():
        insts = "<br>".join(
            esc(f"{i}: {d['address']} v={d['version'] or '-'} {d['state']} w={d['weight']}")
            for i, d in svc["instances"].items()
        )
        rows.append(
            f"<tr><td>{esc(name)}</td><td>{esc(str(svc['active_version']))}</td>"
            f"<td>{insts}</td></tr>"
        )
    applies = "".join(f"<li>{esc(json.dumps(a))}</li>" for a in status["recent_applies"])
    return (
        "<!doctype html><meta charset=utf-8><title>fluster reloader</title>"
        f"<h1>fluster reloader {esc(status['id'])}</h1>"
        f"<p>revision {status['revision']} (applied {status['applied_revision']}), "
        f"HAProxy {'up' if status['haproxy_up'] else 'DOWN'}, "
        f"sync age {status['sync_age_seconds']}</p>"
        "<table border=1><tr><th>service</th><th>active version</th><th>instances</th></tr>"
        + "".join(rows)
        + f"</table><h2>Recent applies</h2><ul>{applies}</ul>"
    )


class StatusServer:
    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        stats: Stats,
        healthy: Callable[[], tuple[bool, str]],
    ) -> None:
        self.status, self.stats, self.healthy = status, stats, healthy
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        app.router.add_get("/", self._index)
        self.runner = web.AppRunner(app, access_log=None)

    async def start(self, host: str, port: int) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, host or None, port).start()

    async def close(self) -> None:
        await self.runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        ok, why = self.healthy()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            text=metrics_text(self.status(), self.stats), content_type="text/plain", charset="utf-8"
        )

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _index(self, _: web.Request) -> web.Response:
        return web.Response(text=html_page(self.status()), content_type="text/html")
