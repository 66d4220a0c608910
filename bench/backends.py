"""Many tiny HTTP backends in one process: one listening socket per backend, one loop.

Each backend answers every request with its own port as the body, which is how a probe
knows which server HAProxy picked. A raw asyncio protocol rather than aiohttp because a
thousand backends must cost less than the thing being measured: this serves ~10k small
requests a second on one core, and a listening socket costs a few kB.

Run as `python -m bench.backends FIRST_PORT COUNT`: binds COUNT free ports from FIRST_PORT
up (skipping busy ones) on 127.0.0.1 and prints them as one JSON line, then serves until
stdin closes or it is signalled.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from testbed.process import wait_or_kill

_HEAD_END = b"\r\n\r\n"


class _Backend(asyncio.Protocol):
    """HTTP/1.1 keep-alive, GET/HEAD/OPTIONS only, no bodies: all HAProxy and probes send."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.buffer = b""
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(_HEAD_END)) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self.transport.write(self.reply)
            lowered = head.lower()
            # HTTP/1.0 health checks and `Connection: close` clients wait for the close.
            if b"http/1.0" in lowered.split(b"\r\n", 1)[0] or b"connection: close" in lowered:
                self.transport.close()
                return


def _reply(port: int) -> bytes:
    body = f"{port}\n".encode()
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def _bind(first: int, count: int) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    port = first
    while len(sockets) < count and port < 65536:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(512)
        except OSError:
            sock.close()
        else:
            sockets.append(sock)
        port += 1
    if len(sockets) < count:
        raise SystemExit(f"only {len(sockets)} of {count} ports free from {first}")
    return sockets


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(first: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    sockets = _bind(first, count)
    for sock in sockets:
        port = sock.getsockname()[1]
        reply = _reply(port)
        await loop.create_server(lambda reply=reply: _Backend(reply), sock=sock, backlog=512)
    print(json.dumps([s.getsockname()[1] for s in sockets]), flush=True)
    # Serve until our parent goes away (stdin closes) so a crashed bench leaks nothing.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    raise_fd_limit()
    try:
        import uvloop

        uvloop.run(_serve(int(args[0]), int(args[1])))
    except KeyboardInterrupt:
        pass
    return 0


class Backends:
    """The backend process, started from the bench: `ports` are the ones it serves."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self.proc: subprocess.Popen[str] | None = None
        self.ports: list[int] = []

    def start(self) -> Backends:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.backends", str(self.first), str(self.count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("backend process exited before binding its ports")
        self.ports = json.loads(line)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        wait_or_kill(self.proc, 5)
        self.proc = None


if __name__ == "__main__":
    sys.exit(main())
