"""fluster.http1, the sidekick's HTTP/1.1 client, against small servers on loopback.

The servers are plain sockets in a thread: what matters here is what the client does
with the bytes a peer sends (or does not send), which a real etcd or Docker engine
cannot be made to misbehave for. The client against real ones is tested through the
store (test_store, test_etcd_faults, test_reliability_rbac) and the sidekick's Docker
tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fluster.http1 import Address, Client
from testbed.pki import Pki

Serve = Callable[[socket.socket], None]


def open_sockets() -> int:
    """How many sockets this process holds open."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(fds / fd).startswith("socket:")
        except OSError:
            continue  # the directory's own fd, closed while we looked
    return count


class Server:
    """Accepts connections on 127.0.0.1 and hands each to `serve` in a thread; keeps
    every accepted socket open until stop(), so only the client's sockets come and go."""

    def __init__(self, serve: Serve, tls: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.serve, self.tls = serve, tls
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # stopped
            if self.tls:
                try:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError):
                    sock.close()
                    continue
            self.accepted.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self.serve(sock)

    def stop(self) -> None:
        self.listener.close()
        for sock in self.accepted:
            sock.close()


def read_request(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def answer_once_then_hold(sock: socket.socket) -> None:
    """One response, kept alive; then never reads again (so never answers a TLS
    close_notify) and never closes."""
    read_request(sock)
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    threading.Event().wait()


@pytest.fixture
def server_tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    pki = Pki(tmp_path / "pki")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pki.server_cert, pki.server_key)
    return server, ssl.create_default_context(cafile=str(pki.ca))


@pytest.fixture
def holding_server(
    request: pytest.FixtureRequest, server_tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> Iterator[tuple[Server, ssl.SSLContext | None]]:
    tls = request.param == "tls"
    server = Server(answer_once_then_hold, server_tls[0] if tls else None)
    yield server, server_tls[1] if tls else None
    server.stop()


@pytest.mark.parametrize("holding_server", ["tcp", "tls"], indirect=True)
async def test_close_releases_a_kept_alive_socket_at_once(
    holding_server: tuple[Server, ssl.SSLContext | None],
) -> None:
    """A kept-alive connection's socket is released when close() returns, also when the
    peer would never answer a TLS close_notify: left to the SSL shutdown, the socket
    outlived the event loop and was reported unclosed in whatever test ran next."""
    server, tls = holding_server
    client = Client(Address("127.0.0.1", server.port, tls=tls), host="test", timeout=5)
    before = open_sockets()
    response = await client.request("GET", "/")
    assert (response.status, response.body) == (200, b"ok")
    held = open_sockets()
    assert held == before + 2, "the client's kept-alive socket and the server's"
    await client.close()
    assert open_sockets() == held - 1, "the client's socket is still open after close()"


async def test_a_stream_left_early_releases_its_socket(
    server_tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A watch is rarely read to its end: leaving the block releases its socket."""

    def endless(sock: socket.socket) -> None:
        read_request(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"6\r\nline1\n\r\n")
        threading.Event().wait()

    server = Server(endless, server_tls[0])
    try:
        client = Client(Address("127.0.0.1", server.port, tls=server_tls[1]), host="test")
        before = open_sockets()
        async with client.stream("GET", "/watch") as stream:
            async for line in stream.lines():
                assert line == b"line1"
                break
            assert open_sockets() == before + 2
        assert open_sockets() == before + 1, "the stream's socket is still open"
    finally:
        server.stop()
