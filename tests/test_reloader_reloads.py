"""Seamless reloads: 20 structural changes under live traffic lose no request."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable

from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess

KEY = "/fluster/services/{}/instances/{}"


class Traffic:
    """Request loops through HAProxy until stopped: one opens a connection per request,
    one keeps a connection alive (reconnecting only when the server says close)."""

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._loop, args=(keepalive,), daemon=True)
            for keepalive in (False, True)
        ]

    def _count(self, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.ok += 1
            else:
                self.failures.append(error)

    def _loop(self, keepalive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/", headers={"Host": self.host})
                resp = conn.getresponse()
                resp.read()
                self._count(None if resp.status == 200 else f"status {resp.status}")
                if resp.will_close or not keepalive:
                    conn.close()
            except (OSError, http.client.HTTPException) as exc:
                self._count(f"{'keep-alive' if keepalive else 'new'}: {exc!r}")
                conn.close()
        conn.close()

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


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
