"""Seamless reloads: 20 structural changes under live traffic lose no request; a master
that dies during a reload."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from reloader.haproxy import RELOAD_TIMEOUT, Haproxy
from testbed.load import RequestLoops
from tests.support.etcd import Etcd, free_port, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess

KEY = "/fluster/services/{}/instances/{}"


class Traffic(RequestLoops):
    """Request loops through HAProxy as fast as they go (no pacing), counting answers."""

    def __init__(self, port: int, host: str) -> None:
        super().__init__(port, host, limit=300.0, pace=0.0)
        self.ok = 0

    def answered(self, body: bytes, sent: float) -> None:
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


def reexecuted(master: int) -> bool:
    """A HAProxy master re-executes itself to reload, with `-sf OLD_WORKERS` appended."""
    return b"-sf" in Path(f"/proc/{master}/cmdline").read_bytes()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return bytes(reply.read())


async def test_a_master_killed_during_a_reload_has_its_successor_reloaded(tmp_path: Path) -> None:
    """The reloader's HAProxy supervisor on a real HAProxy: the master dies while it
    parses the reloaded config (a large file keeps it parsing long enough to be caught);
    `reload()` returns as soon as the restarted master runs the file, instead of waiting
    out RELOAD_TIMEOUT for a worker of the dead master (CI caught a 15 s stall)."""
    config = tmp_path / "haproxy.cfg"
    status_port = free_port()
    head = [
        "global",
        f"  stats socket {tmp_path}/admin.sock mode 600 level admin",
        "defaults",
        "  mode http",
        "  timeout connect 1s",
        "  timeout client 1s",
        "  timeout server 1s",
        "frontend status",
        f"  bind 127.0.0.1:{status_port}",
        "  http-request return status 200 content-type text/plain string {}",
    ]
    config.write_text("\n".join([*head[:-1], head[-1].format("v1")]) + "\n")
    haproxy = Haproxy("haproxy", config, tmp_path / "master.sock")
    await haproxy.start()
    supervisor = asyncio.create_task(haproxy.supervise())
    try:
        master = haproxy.proc
        assert master is not None
        servers = [f"  server s{i} 127.0.0.1:{10000 + i}" for i in range(5000)]
        body = [*head[:-1], head[-1].format("v2"), "backend big", *servers]
        config.write_text("\n".join(body) + "\n")
        reload = asyncio.create_task(haproxy.reload())
        deadline = time.monotonic() + 10
        while not reexecuted(master.pid):  # parsing the new file
            assert time.monotonic() < deadline, "the master never re-executed for the reload"
            assert not reload.done(), "the reload finished before the master could be killed"
            await asyncio.sleep(0.001)
        os.kill(master.pid, signal.SIGKILL)
        started = time.monotonic()
        processes = await asyncio.wait_for(reload, RELOAD_TIMEOUT)
        took = time.monotonic() - started
        assert haproxy.proc is not master and haproxy.restarts == 1
        assert processes.workers, processes
        assert took < RELOAD_TIMEOUT / 2, f"reload() returned {took:.1f}s after the kill"
        assert await asyncio.to_thread(fetch, f"http://127.0.0.1:{status_port}/") == b"v2"
    finally:
        await haproxy.stop(grace=1)
        supervisor.cancel()
