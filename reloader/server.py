"""The reloader's own HTTP face: /healthz, /status, /metrics and the dashboard at /.

/healthz is what a Docker HEALTHCHECK or an orchestrator probes: 503 when HAProxy is
down or our view of etcd is older than the threshold (a reloader that lost etcd keeps
serving the last config, but should be looked at). The other three read one `Status`
snapshot each (reloader/status.py), built per request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from reloader import dashboard, metrics
from reloader.status import Status


class StatusServer:
    def __init__(
        self,
        status: Callable[[], Status],
        healthy: Callable[[], tuple[bool, str]],
        acme_answer: Callable[[str], Awaitable[str | None]] | None = None,
    ) -> None:
        self.status, self.healthy = status, healthy
        self.acme_answer = acme_answer
        self.registry = metrics.registry(status)
        self.probe = dashboard.EndpointProbe()
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        app.router.add_get("/", self._index)
        if acme_answer is not None:  # HAProxy sends the CA's HTTP-01 requests here
            app.router.add_get("/.well-known/acme-challenge/{token}", self._acme)
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
            body=metrics.exposition(self.registry),
            headers={"Content-Type": metrics.CONTENT_TYPE},
        )

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(self.status().to_json())

    async def _acme(self, request: web.Request) -> web.Response:
        assert self.acme_answer is not None
        answer = await self.acme_answer(request.match_info["token"])
        if answer is None:
            return web.Response(status=404, text="no such challenge\n")
        return web.Response(text=answer, content_type="application/octet-stream")

    async def _index(self, _: web.Request) -> web.Response:
        status = self.status()
        reachable = await self.probe.reachable(status.etcd_endpoints)
        return web.Response(
            text=dashboard.page(status, reachable),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )
