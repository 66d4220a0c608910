"""A minimal HTTP/1.1 client that asks HAProxy, as fast as it answers, "who served this?".

The backends answer with their own port (bench/backends.py), so "the new backend is
serving" means "a response body names its port". Raw asyncio streams rather than aiohttp:
the probe's own overhead (~0.1 ms a request) bounds the resolution of every latency we
report, and it must reconnect silently when a reload closes its keep-alive connection.
"""

from __future__ import annotations

import asyncio
import time


class Probe:
    def __init__(self, port: int, host: str, *, address: str = "127.0.0.1") -> None:
        self.address, self.port = address, port
        self.request = f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fluster-bench\r\n\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.requests = 0
        self.errors = 0  # connection failures/resets: expected around a reload, retried

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def get(self) -> tuple[int, bytes]:
        """One request; (status, body), or (0, b"") when the connection failed."""
        self.requests += 1
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.address, self.port)
            assert self.reader is not None
            self.writer.write(self.request.encode())
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length, close = -1, False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection" and "close" in value.lower():
                    close = True
            if length >= 0:
                body = await self.reader.readexactly(length)
            else:
                body, close = await self.reader.read(), True
            if close:
                self.close()
            return status, body
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.errors += 1
            self.close()
            await asyncio.sleep(0.001)  # haproxy may be between processes: don't spin
            return 0, b""

    async def until(self, want: bytes, within: float) -> float | None:
        """Monotonic time of the first response whose body is `want`; None at the deadline."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            status, body = await self.get()
            if status == 200 and body.strip() == want:
                return time.monotonic()
            if status != 200:
                await asyncio.sleep(0.0005)  # 503/404 until the route exists: poll gently
        return None

    async def gone(self, unwanted: bytes, requests: int, within: float) -> bool:
        """True once `requests` responses in a row did not come from `unwanted`."""
        deadline = time.monotonic() + within
        streak = 0
        while time.monotonic() < deadline:
            status, body = await self.get()
            streak = streak + 1 if status and body.strip() != unwanted else 0
            if streak >= requests:
                return True
        return False
