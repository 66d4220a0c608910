"""How a Store reaches etcd: the settings every component shares, the endpoints and
their resolution (the wire itself is the transport's: fluster/store_grpc.py,
fluster/store_http.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """How to reach etcd: shared by every component (docs/REGISTRY.md, the environment)."""

    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_server_name: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    # grpc, http (etcd's JSON gateway) or auto: the component's own choice
    # (fluster.store.transport_for).
    transport: Literal["auto", "grpc", "http"] = "auto"

    @property
    def tls(self) -> bool:
        return self.cacert is not None or any(e.startswith("https://") for e in self.endpoints)

    def plaintext_off_loopback(self) -> list[str]:
        """Endpoints reached in plain text at an address that is not loopback: whoever
        else reaches that address can read and rewrite the registry."""
        if self.tls:
            return []
        out = []
        for endpoint in self.endpoints:
            try:
                host, _ = parse_endpoint(endpoint)
            except ValueError:
                continue
            if host == "localhost":
                continue
            try:
                if ipaddress.ip_address(host).is_loopback:
                    continue
            except ValueError:
                pass  # a name: where it points is up to DNS
            out.append(endpoint)
        return out


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """`host:port`, `http(s)://host:port` or `[v6]:port` -> (host, port). Raises ValueError."""
    text = endpoint.strip()
    url = urlsplit(text if "://" in text else f"//{text}")
    if url.scheme not in ("", "http", "https") or not url.hostname or url.path or " " in text:
        raise ValueError(f"not an etcd endpoint: {endpoint!r} (want host:port)")
    try:
        port = url.port or 2379
    except ValueError:
        raise ValueError(f"bad port in etcd endpoint {endpoint!r}") from None
    return url.hostname, port


def endpoints_from_text(text: str) -> tuple[str, ...]:
    """Split `ETCD_ENDPOINTS`; validates each (raises ValueError naming the bad one)."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts:
        raise ValueError("no etcd endpoints given")
    errors = []
    for part in parts:
        try:
            parse_endpoint(part)
        except ValueError as exc:
            errors.append(str(exc))
    if errors:
        raise ValueError("; ".join(errors))
    return parts


class Unresolved(OSError):
    """An endpoint's name does not resolve (now: DNS may answer later)."""


async def resolve(host: str, port: int) -> str:
    """`host` as the address gRPC dials (a name resolved here, once)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:  # socket.gaierror: a name that does not resolve
            raise Unresolved(
                f"cannot resolve etcd endpoint {host}: {exc.strerror or exc}"
            ) from None
        if not infos:
            raise Unresolved(f"cannot resolve etcd endpoint {host}") from None
        ip = ipaddress.ip_address(infos[0][4][0])
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
