"""Health gating: an app is registered only while its checks say it is healthy.

The rise/fall counting is a pure class (`HealthGate`) so flapping is tested without
clocks or sockets. The probes are deliberately tiny: HTTP is one HTTP/1.0 GET on a raw
stream (importing an HTTP client costs more memory than the whole check loop), TCP is a
connect, and `docker` takes the container's own HEALTHCHECK status from Docker's
events (Docker has already counted its retries, so no rise/fall on top).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from fluster.records import CHECK_PATH_RE

log = structlog.get_logger("sidekick.health")

Kind = Literal["http", "tcp", "docker", "none"]
# A probe answers healthy/unhealthy, or None for "cannot tell now": an unknown result
# must not deregister a healthy app.
Probe = Callable[[], Awaitable[bool | None]]


@dataclass(frozen=True, slots=True)
class CheckSpec:
    kind: Kind
    path: str = "/"

    def __str__(self) -> str:
        return f"http:{self.path}" if self.kind == "http" else self.kind


def parse_check(text: Any) -> CheckSpec:
    """`http:/path`, `http` (path /), `tcp`, `docker` or `none`; raises ValueError."""
    value = str(text).strip()
    if value in ("tcp", "docker", "none"):
        return CheckSpec(value)  # type: ignore[arg-type]
    if value == "http" or value.startswith("http:"):
        path = value[5:] or "/"
        if not CHECK_PATH_RE.fullmatch(path):
            raise ValueError(f"http check path must be a URL path like /health, got {path!r}")
        return CheckSpec("http", path)
    raise ValueError(f"want http:/path, tcp, docker or none, got {value!r}")


class HealthGate:
    """Rise/fall hysteresis: `rise` passes in a row to turn healthy, `fall` failures to not.

    Starts unhealthy: an app is not sent traffic until it has proved itself.
    """

    def __init__(self, rise: int, fall: int, healthy: bool = False) -> None:
        self.rise, self.fall = rise, fall
        self.healthy = healthy
        self._streak = 0  # consecutive results that disagree with the current state

    def observe(self, ok: bool) -> bool | None:
        """Feed one result; returns the new state when it changed, else None."""
        if ok == self.healthy:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak >= (self.rise if ok else self.fall):
            self.healthy, self._streak = ok, 0
            return ok
        return None


async def probe_tcp(host: str, port: int, limit: float) -> bool:
    try:
        async with asyncio.timeout(limit):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def probe_http(host: str, port: int, path: str, limit: float) -> bool:
    """GET `path`; healthy on a 2xx or 3xx status line."""
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"GET {path} HTTP/1.0\r\nHost: {hostport}\r\nUser-Agent: fluster-sidekick\r\n\r\n"
    writer = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request.encode("ascii"))
            await writer.drain()
            status = await reader.readline()
    except (OSError, TimeoutError, UnicodeError):
        return False
    finally:
        if writer is not None:
            writer.close()
    parts = status.split()
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1][:1] in (b"2", b"3")


def make_probe(spec: CheckSpec, host: str, port: int, timeout: float) -> Probe | None:
    """The probe for `spec` against `host:port`; None when we do not probe ourselves
    (`none`, and `docker`, which follows Docker's health_status events instead)."""
    if spec.kind == "http":
        return lambda: probe_http(host, port, spec.path, timeout)
    if spec.kind == "tcp":
        return lambda: probe_tcp(host, port, timeout)
    return None


def docker_healthy(status: str) -> bool:
    """Docker already counted retries; "none" (no HEALTHCHECK) has no veto."""
    return status in ("healthy", "none")


async def watch_health(
    probe: Probe, gate: HealthGate, interval: float, on_change: Callable[[bool], None]
) -> None:
    """Run `probe` every `interval` seconds forever, reporting state changes."""
    while True:
        result = await probe()
        if result is False:
            log.debug("app check failed")  # each one; the state change is logged elsewhere
        changed = None if result is None else gate.observe(result)
        if changed is not None:
            on_change(changed)
        await asyncio.sleep(interval)
