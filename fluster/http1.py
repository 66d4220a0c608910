"""HTTP/1.1 over asyncio streams: how the sidekick talks to etcd's JSON gateway and to
the Docker engine.

Why not aiohttp, which the deployer and the reloader use: importing it costs 14 MB of
RSS, more than half of the sidekick's 25 MB budget (`python -m bench.sidekick_footprint`),
and what the sidekick asks of HTTP is small: a request with a JSON body on a kept-alive
connection, its response read whole (Content-Length, chunked, or to the end), or read as
it arrives (a watch, Docker's events). Nothing else: no redirects, cookies, compression
or proxies, and every response is bounded (`MAX_BODY`, `MAX_HEAD`).

Every failure to talk (refused, reset, a response that is not HTTP) raises `OSError`
(`ProtocolError` for the last); the caller maps it to its own words.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

MAX_HEAD = 64 * 1024  # status line and headers
MAX_BODY = 64 * 1024 * 1024  # as gRPC's receive limit for etcd
MAX_IDLE = 4  # kept-alive connections per client
CLOSE_WAIT = 1.0  # seconds a closed connection may take to release its socket


class ProtocolError(OSError):
    """The peer's answer is not HTTP/1.1 we understand (or is larger than allowed)."""


@dataclass(frozen=True, slots=True)
class Address:
    """Where a client connects: a Unix socket, or TCP with optional TLS."""

    host: str = ""
    port: int = 0
    unix: str | None = None
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None

    def __str__(self) -> str:
        if self.unix:
            return f"unix://{self.unix}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix:
            return await asyncio.open_unix_connection(self.unix, limit=MAX_HEAD)
        return await asyncio.open_connection(
            self.host,
            self.port,
            ssl=self.tls,
            server_hostname=(self.server_hostname or self.host) if self.tls else None,
            limit=MAX_HEAD,
        )


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def close(self) -> None:
        """Drop the connection and wait until its socket is released. No TLS close_notify
        exchange: nothing is left to read, and a peer that never answers it would hold
        the socket open (for the SSL shutdown timeout, or past the end of the event loop,
        where it leaks)."""
        self.writer.transport.abort()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT):
                await self.writer.wait_closed()

    async def send(self, head: bytes, body: bytes) -> None:
        self.writer.write(head + body)
        await self.writer.drain()

    async def read_head(self) -> tuple[int, dict[str, str]]:
        """Status and headers of the next response (1xx ones skipped)."""
        while True:
            try:
                raw = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise ConnectionResetError("connection closed before a response") from None
                raise ProtocolError("connection closed inside a response head") from None
            except asyncio.LimitOverrunError:
                raise ProtocolError(f"response head over {MAX_HEAD} bytes") from None
            lines = raw.decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise ProtocolError(f"not an HTTP/1.1 response: {lines[0][:80]!r}")
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            if not 100 <= int(code) < 200:
                return int(code), headers

    async def chunks(self, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
        """The body as it arrives; ends at its end (the connection is then reusable unless
        the body ran to the end of the connection). A connection closed inside the body
        raises ConnectionResetError."""
        try:
            async for chunk in self._chunks(headers):
                yield chunk
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("connection closed inside a response body") from None

    async def _chunks(self, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                try:
                    size_line = await self.reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
                except (ValueError, asyncio.LimitOverrunError):
                    raise ProtocolError("bad chunk size in a chunked response") from None
                if size == 0:
                    while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                        pass  # trailers
                    return
                if size > MAX_BODY:
                    raise ProtocolError(f"chunk of {size} bytes is over {MAX_BODY}")
                data = await self.reader.readexactly(size + 2)
                yield data[:-2]
        elif "content-length" in headers:
            try:
                left = int(headers["content-length"])
            except ValueError:
                raise ProtocolError("bad Content-Length") from None
            if not 0 <= left <= MAX_BODY:
                raise ProtocolError(f"body of {left} bytes is over {MAX_BODY}")
            while left:
                data = await self.reader.read(min(left, 65536))
                if not data:
                    raise ConnectionResetError("connection closed inside a response body")
                left -= len(data)
                yield data
        else:
            while data := await self.reader.read(65536):
                yield data


class Stream:
    """A response being read as it arrives (`Client.stream`)."""

    def __init__(self, status: int, headers: dict[str, str], body: AsyncIterator[bytes]) -> None:
        self.status, self.headers, self._body = status, headers, body
        self._buffer = b""

    async def read(self) -> bytes:
        """Everything left (bounded by MAX_BODY): for an error response."""
        out = [self._buffer]
        size = len(self._buffer)
        self._buffer = b""
        async for chunk in self._body:
            size += len(chunk)
            if size > MAX_BODY:
                raise ProtocolError(f"response over {MAX_BODY} bytes")
            out.append(chunk)
        return b"".join(out)

    async def lines(self) -> AsyncIterator[bytes]:
        """Each newline-terminated line (without the newline); a last unterminated one
        too. A line longer than MAX_BODY is a ProtocolError."""
        async for chunk in self._body:
            self._buffer += chunk
            while (cut := self._buffer.find(b"\n")) >= 0:
                line, self._buffer = self._buffer[:cut], self._buffer[cut + 1 :]
                yield line
            if len(self._buffer) > MAX_BODY:
                raise ProtocolError(f"a line over {MAX_BODY} bytes")
        if self._buffer:
            line, self._buffer = self._buffer, b""
            yield line


class Client:
    """Requests to one address, reusing up to MAX_IDLE kept-alive connections.

    `request` reads the whole response within `timeout` seconds (None: no limit);
    `stream` holds a connection of its own for as long as the caller reads."""

    def __init__(self, address: Address, *, host: str, timeout: float | None = None) -> None:
        self.address, self.host, self.timeout = address, host, timeout
        self._idle: list[_Connection] = []

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()

    def _head(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}"]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        for name, value in (headers or {}).items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} holds a line break")
            lines.append(f"{name}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _open(self, reuse: bool) -> tuple[_Connection, bool]:
        if reuse and self._idle:
            return self._idle.pop(), True
        return _Connection(*await self.address.open()), False

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        head = self._head(method, path, body, headers)
        async with asyncio.timeout(self.timeout):
            while True:
                conn, reused = await self._open(reuse=True)
                try:
                    await conn.send(head, body or b"")
                    status, answer = await conn.read_head()
                except (ConnectionError, asyncio.IncompleteReadError):
                    await conn.close()
                    if reused:
                        continue  # the server closed an idle connection: a fresh one
                    raise
                except BaseException:
                    await conn.close()
                    raise
                try:
                    data = bytearray()
                    if method != "HEAD" and status not in (204, 304):
                        async for chunk in conn.chunks(answer):
                            data += chunk
                            if len(data) > MAX_BODY:
                                raise ProtocolError(f"response over {MAX_BODY} bytes")
                except BaseException:
                    await conn.close()
                    raise
                if self._reusable(answer) and len(self._idle) < MAX_IDLE:
                    self._idle.append(conn)
                else:
                    await conn.close()
                return Response(status, answer, bytes(data))

    @staticmethod
    def _reusable(headers: Mapping[str, str]) -> bool:
        framed = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "")
        return framed and headers.get("connection", "").lower() != "close"

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Stream]:
        """Send a request on a new connection and hand its response over as it arrives;
        the connection is closed when the block ends (a stream is rarely read to its end)."""
        conn, _ = await self._open(reuse=False)
        try:
            async with asyncio.timeout(self.timeout):
                await conn.send(self._head(method, path, body, headers), body or b"")
                status, answer = await conn.read_head()
            yield Stream(status, answer, conn.chunks(answer))
        finally:
            await conn.close()
