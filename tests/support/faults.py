"""Fault-test tools: bounded HTTP load, HAProxy's view of its servers, a cuttable link.

`Load` runs a few client threads that each send one request per new connection to a
frontend with a Host header, until stopped or a request/time cap is hit (never more
than `max_requests` in total, never longer than `max_seconds`). Every failure is kept
with its time and reason, so a test can say "0 failed requests" and, when it is not 0,
show exactly when and why. Threads, not the test's event loop: a blocking etcdctl call
in the test must not look like an HAProxy stall.

`haproxy_servers` and `service_servers` (from testbed.servers) ask HAProxy itself
which servers each backend routes to, for the "HAProxy's servers equal etcd's" checks.

`TcpProxy` stands between one client and etcd: `cut()` resets every connection and
refuses new ones (a partition of that client alone, while everyone else still reaches
etcd), `heal()` lets them through again.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from testbed.servers import haproxy_servers, service_servers

__all__ = ["Failure", "Load", "TcpProxy", "haproxy_servers", "service_servers"]


@dataclass
class Failure:
    at: float
    reason: str


@dataclass
class Load:
    port: int
    host_header: str
    threads: int = 4
    pause: float = 0.005
    max_requests: int = 20_000
    max_seconds: float = 60.0
    timeout: float = 5.0
    ok: int = 0
    failures: list[Failure] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)
    _sent: int = 0

    def start(self) -> Load:
        self.started = time.monotonic()
        for i in range(self.threads):
            thread = threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)
        return self

    def stop(self) -> Load:
        self._stop.set()
        for thread in self._workers:
            thread.join(self.timeout + 5)
        return self

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    def _take(self) -> bool:
        with self._lock:
            if self._sent >= self.max_requests:
                return False
            self._sent += 1
            return True

    def _run(self) -> None:
        deadline = self.started + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline and self._take():
            self.one()
            time.sleep(self.pause)

    def one(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            conn.request("GET", "/", headers={"Host": self.host_header, "Connection": "close"})
            reply = conn.getresponse()
            body = reply.read().decode(errors="replace")
            if reply.status != 200:
                raise OSError(f"HTTP {reply.status}: {body[:80]!r}")
        except (OSError, http.client.HTTPException) as exc:
            with self._lock:
                self.failures.append(Failure(time.monotonic() - self.started, repr(exc)))
            return False
        finally:
            conn.close()
        with self._lock:
            self.ok += 1
            self.answers[body.strip()] += 1
        return True

    def summary(self) -> str:
        shown = "; ".join(f"{f.at:.2f}s {f.reason}" for f in self.failures[:10])
        return f"{self.ok} ok, {len(self.failures)} failed: {shown}"


class TcpProxy:
    """`bind`:`port` -> `target`, in threads; `cut()`/`heal()` make a partition."""

    def __init__(self, target: tuple[str, int], bind: str = "127.0.0.1") -> None:
        self.target = target
        self.bind = bind
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((bind, 0))
        self.listener.listen(64)
        self.port = int(self.listener.getsockname()[1])
        self.cut_off = threading.Event()
        self.closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{self.bind}:{self.port}"

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                _reset(sock)
            with self._lock:
                self._conns -= {src, dst}

    def cut(self) -> None:
        """Reset every connection through us and refuse new ones until heal()."""
        self.cut_off.set()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            _reset(sock)

    def heal(self) -> None:
        self.cut_off.clear()

    def close(self) -> None:
        self.closed.set()
        self.cut()
        self.listener.close()


def _reset(sock: socket.socket) -> None:
    """Drop a connection at once (linger 0: RST); also wakes a thread blocked in recv."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
