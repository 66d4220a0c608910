"""Seamless reloads: 20 structural changes under live traffic lose no request."""

from __future__ import annotations

from collections.abc import Callable

from testbed.load import RequestLoops
from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess

KEY = "/fluster/services/{}/instances/{}"


class Traffic(RequestLoops):
    """Request loops through HAProxy as fast as they go (no pacing), counting answers."""

    def __init__(self, port: int, host: str) -> None:
        super().__init__(port, host, limit=300.0, pace=0.0)
        self.ok = 0

    def answered(self, body: bytes) -> None:
        self.ok += 1


def test_twenty_reloads_under_traffic_lose_no_request(
    etcd: Etcd,
    start_reloader: Callable[..., ReloaderProcess],
    backends: Callable[..., list[HttpBackend]],
) -> None:
    a, b, extra = backends(3)
    etcd.put(KEY.format("web", "a"), a.json())
    etcd.put(KEY.format("web", "b"), b.json())
    reloader = start_reloader("--http-pool", "0")  # so that each new service reloads
    reloader.wait_served("web.localhost", {a.ident, b.ident})
    with Traffic(reloader.http_port, "web.localhost") as traffic:
        for n in range(20):
            before = reloader.status()["applies"]["reload"]
            etcd.put(KEY.format(f"svc{n}", "x"), extra.json())  # a new service: a reload
            wait_for(
                lambda b=before: reloader.status()["applies"]["reload"] > b,  # type: ignore[misc]
                timeout=15,
                what=f"reload {n + 1}",
            )
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.ok > 100
    assert reloader.status()["applies"]["reload"] >= 20
