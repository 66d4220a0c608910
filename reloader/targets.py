"""What the edge may connect to and listen on, judged before anything is rendered.

A record is written by whoever can write etcd (a sidekick, a script, an operator), and
HAProxy connects wherever a server line points and binds whatever port a TCP spec asks
for. So three facts about the host are gathered before each render, and a record that
would hurt the edge or another service is left out with a reason instead:

- instance host names are resolved here, with a timeout, and the config carries only IP
  addresses: `haproxy -c` and reloads then never wait on DNS nor fail on a name that
  does not resolve, and a name that resolves later comes in with the next re-resolution.
  (HAProxy's own `init-addr`/`resolvers` would do it inside HAProxy, but 2.6 accepts
  neither for servers added through the runtime API, which is how instances arrive.)
- a TCP service's port is tried with a bind before it is rendered: a port another
  process holds would make the reload fail to bind and pause every frontend;
- an instance address must not be the edge itself (a request loop, or a path into the
  status page or etcd), an unspecified or link-local (cloud metadata) address, nor
  outside the operator's allow/deny lists: a well-formed record must not turn the edge
  into a proxy to places the network trusts it to reach (SSRF).

`target_problem` is pure; `port_holder` and `Resolver` do the I/O.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("reloader.targets")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated CIDRs (`10.0.0.0/8,fd00::/8`); raises ValueError naming a bad one."""
    nets = []
    for part in text.split(","):
        part = part.strip()
        if part:
            try:
                nets.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"not a CIDR network: {part!r}") from None
    return tuple(nets)


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """Where instances may point. Empty `allow` allows every address not denied."""

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    # (port, what) of the edge's own listeners, and the etcd endpoints as (host, port).
    own_ports: tuple[tuple[int, str], ...] = ()
    etcd: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the world looked like just before a render."""

    addresses: Mapping[str, str | None] = field(default_factory=dict)  # name -> IP | None
    local: frozenset[str] = frozenset()  # IPs that are this host's own
    busy_ports: Mapping[int, str] = field(default_factory=dict)  # port -> why unusable


def _plain(ip: Address) -> Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_local(ip: str, facts: HostFacts) -> bool:
    return _plain(ipaddress.ip_address(ip)).is_loopback or ip in facts.local


def target_problem(
    ip_text: str, port: int, policy: TargetPolicy, facts: HostFacts, tcp_ports: Iterable[int] = ()
) -> str | None:
    """Why an instance at `ip_text`:`port` must not be rendered, or None if it may."""
    ip = _plain(ipaddress.ip_address(ip_text))
    if ip.is_unspecified:
        return f"{ip_text} is the unspecified address (it means this host)"
    if ip.is_link_local:
        return f"{ip_text} is link-local (cloud metadata services live there)"
    if ip.is_multicast:
        return f"{ip_text} is a multicast address"
    if policy.allow and not any(ip in net for net in policy.allow):
        return f"{ip_text} is outside the allowed networks (--target-allow)"
    denied = next((net for net in policy.deny if ip in net), None)
    if denied is not None:
        return f"{ip_text} is in the denied network {denied} (--target-deny)"
    local = ip.is_loopback or str(ip) in facts.local or ip_text in facts.local
    if local:
        own = dict(policy.own_ports)
        for tcp in tcp_ports:
            own.setdefault(tcp, f"TCP frontend on port {tcp}")
        if port in own:
            return f"{ip_text}:{port} is this edge's own {own[port]}"
    for host, etcd_port in policy.etcd:
        etcd_ip = facts.addresses.get(host, host)
        if port != etcd_port or etcd_ip is None:
            continue
        if etcd_ip == ip_text or (local and _local_literal(etcd_ip, facts)):
            return f"{ip_text}:{port} is an etcd endpoint of this reloader"
    return None


def _local_literal(host: str, facts: HostFacts) -> bool:
    try:
        return is_local(host, facts)
    except ValueError:
        return False


def etcd_targets(endpoints: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """`http(s)://host:port` or `host:port` endpoints as (host, port) pairs."""
    out = []
    for endpoint in endpoints:
        rest = endpoint.split("://", 1)[-1].rstrip("/")
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            out.append((host.strip("[]").lower(), int(port)))
    return tuple(out)


def port_holder(host: str, port: int) -> str | None:
    """Why HAProxy could not bind `host`:`port` now (None: it could), found by binding it
    the way HAProxy does (SO_REUSEADDR), then letting go at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is already in use on this host"
            return f"port {port} cannot be bound: {exc.strerror or exc}"
    return None


def local_addresses(candidates: Iterable[str]) -> frozenset[str]:
    """Which of `candidates` (IP literals) are addresses of this host: binding port 0 on
    an address succeeds exactly when the host owns it. No packet is sent."""
    out = set()
    for ip in candidates:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((ip, 0))
            except OSError:
                continue
        out.add(ip)
    return frozenset(out)


@dataclass(slots=True)
class _Answer:
    ip: str | None
    at: float


class Resolver:
    """Host names -> one IP each, cached; answers are refreshed after `ttl` seconds (a
    failed lookup after `retry`), each lookup bounded by `timeout`.

    A name that does not resolve (or not in time) maps to None and its instance is left
    out; the reloader asks again after `retry` seconds and brings it in when it resolves.
    """

    def __init__(
        self,
        timeout: float = 2.0,
        ttl: float = 30.0,
        retry: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout, self.ttl, self.retry, self.clock = timeout, ttl, retry, clock
        self.cache: dict[str, _Answer] = {}

    def _fresh(self, name: str, now: float) -> bool:
        answer = self.cache.get(name)
        if answer is None:
            return False
        return now - answer.at < (self.ttl if answer.ip is not None else self.retry)

    def next_refresh(self) -> float | None:
        """Clock time when the earliest cached answer goes stale."""
        return min(
            (a.at + (self.ttl if a.ip is not None else self.retry) for a in self.cache.values()),
            default=None,
        )

    async def resolve(self, names: Iterable[str]) -> dict[str, str | None]:
        wanted = set(names)
        for gone in self.cache.keys() - wanted:
            del self.cache[gone]
        now = self.clock()
        stale = sorted(n for n in wanted if not self._fresh(n, now))
        if stale:
            answers = await asyncio.gather(*(self._lookup(n) for n in stale))
            for name, ip in zip(stale, answers, strict=True):
                before = self.cache.get(name)
                if before is None or before.ip != ip:
                    log.info(
                        "host name resolved" if ip else "host name does not resolve",
                        name=name,
                        address=ip,
                    )
                self.cache[name] = _Answer(ip, self.clock())
        return {n: self.cache[n].ip for n in sorted(wanted)}

    async def _lookup(self, name: str) -> str | None:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), self.timeout
            )
        except (OSError, TimeoutError, UnicodeError):
            return None
        ips = [str(info[4][0]) for info in infos]
        v4 = [ip for ip in ips if ":" not in ip]
        chosen = v4 or ips
        return chosen[0] if chosen else None
