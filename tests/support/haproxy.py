"""Real HTTP backends and a real reloader (with its real HAProxy) on loopback ports.

`backends(n)` starts threaded HTTP/1.1 servers that answer every request with their own
id, so a test can tell which instance served it. `start_reloader(...)` runs a
`ReloaderProcess` (testbed/reloader.py, shared with the bench) and stops it, and any
HAProxy it left behind, at teardown.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from testbed.etcd import Etcd
from testbed.reloader import HAPROXY, Exited, ReloaderProcess, unix_command

__all__ = ["HAPROXY", "Exited", "HttpBackend", "ReloaderProcess", "backends", "unix_command"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        server: Any = self.server
        if server.first_request_at is None:
            server.first_request_at = time.monotonic()
        body = server.ident.encode()
        server.requests += 1
        if server.delay:
            time.sleep(server.delay)  # a slow release: each answer takes this long
        failing = server.error_every and server.requests % server.error_every == 0
        self.send_response(500 if failing else 200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # HAProxy resets idle server connections; that is not a test failure


class HttpBackend:
    """One instance of an app: answers `ident` on 127.0.0.1:`port` (with status 500 to
    every `error_every`-th request when that is set: a release that passes its health
    check and still fails users)."""

    def __init__(self, ident: str, error_every: int = 0, delay: float = 0.0) -> None:
        self.ident = ident
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.ident = ident  # type: ignore[attr-defined]
        self.server.requests = 0  # type: ignore[attr-defined]
        self.server.error_every = error_every  # type: ignore[attr-defined]
        self.server.delay = delay  # type: ignore[attr-defined]
        # When the first request arrived: registration -> served latency for benchmarks.
        self.server.first_request_at = None  # type: ignore[attr-defined]
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def first_request_at(self) -> float | None:
        return self.server.first_request_at  # type: ignore[attr-defined, no-any-return]

    def json(self, **extra: Any) -> str:
        return json.dumps({"host": "127.0.0.1", "port": self.port, **extra})

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backends() -> Iterator[Callable[..., list[HttpBackend]]]:
    started: list[HttpBackend] = []

    def start(
        count: int = 1, prefix: str = "app", error_every: int = 0, delay: float = 0.0
    ) -> list[HttpBackend]:
        new = [
            HttpBackend(f"{prefix}-{len(started) + i}", error_every, delay) for i in range(count)
        ]
        started.extend(new)
        return new

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def start_reloader(etcd: Etcd, tmp_path: Path) -> Iterator[Callable[..., ReloaderProcess]]:
    """`start_reloader(*extra_args, https=False)` -> a running reloader against the `etcd`
    fixture; with `https`, on an HTTPS port of its own (`.https_port`)."""
    started: list[ReloaderProcess] = []

    def start(*args: str, wait: bool = True, https: bool = False) -> ReloaderProcess:
        proc = ReloaderProcess(etcd, tmp_path / f"reloader{len(started)}", *args, https=https)
        started.append(proc)
        return proc.start(wait=wait)

    yield start
    for proc in started:
        proc.stop()
