"""How a Store reaches etcd: the settings every component shares, the endpoints, and
the one gRPC channel to all members (`round_robin` over the resolved endpoints, so a
dead or frozen member, noticed by HTTP/2 keepalive pings, drops out and calls go to a
live one)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio

# Pings every 6 s, dead after 5 s more without an ack: a frozen member is noticed in ~11 s.
# etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time), hence not lower.
KEEPALIVE_TIME_MS = 6_000
KEEPALIVE_TIMEOUT_MS = 5_000
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


async def open_channel(s: EtcdSettings) -> grpc.aio.Channel:
    """One channel to every member: `round_robin` over the resolved endpoints."""
    hosts = [parse_endpoint(e) for e in s.endpoints]
    addresses = await asyncio.gather(*(resolve(h, p) for h, p in hosts))
    families = {a.startswith("[") for a in addresses}
    if len(families) > 1:
        raise ValueError("etcd endpoints mix IPv4 and IPv6 addresses; use one family")
    target = ("ipv6:" if True in families else "ipv4:") + ",".join(addresses)
    options: list[tuple[str, Any]] = [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # etcd refuses pings on a connection with no open stream (GOAWAY
        # "too_many_pings"); streams are what the pings guard anyway.
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    if not s.tls:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=s.cacert.read_bytes() if s.cacert else None,
        private_key=s.key.read_bytes() if s.key else None,
        certificate_chain=s.cert.read_bytes() if s.cert else None,
    )
    # With several addresses in one target gRPC cannot derive the name to verify.
    options.append(("grpc.ssl_target_name_override", s.tls_server_name or hosts[0][0]))
    return grpc.aio.secure_channel(target, credentials, options=options)


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
