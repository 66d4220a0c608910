"""The host facts a render is judged against, and the one log line per thing left out.

`FactFinder.find(snapshot, live)` does the I/O that reloader.targets describes (resolve
names, probe TCP ports, learn which addresses are this host's own) so that building the
model stays pure. `Reporter` turns the model's skips and the services on a fallback
version into counters and a log line each time one appears or clears, never one per
apply, and says when it is worth looking again (a port may be freed, a name may
resolve) without any record changing.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet

import structlog

from fluster import routing
from fluster.catalog import Service, Snapshot, changed_services
from reloader.model import Model, RenderSettings, Skip, is_ip, own_ports
from reloader.targets import HostFacts, Resolver, local_addresses, port_holder

log = structlog.get_logger("reloader")

# How the default templates bind a TCP service: `frontend tcp_NAME`, then its `bind`.
TCP_BIND = re.compile(r"^frontend tcp_\S+\n(?:[ \t]+(?!bind )\S.*\n)*?[ \t]+bind \S*:(\d+)", re.M)
RECHECK = 5.0  # seconds between retries of something left out for a busy port or DNS


def tcp_ports_in(config: str) -> set[int]:
    """The ports a config's TCP frontends bind (as the default templates write them)."""
    return {int(port) for port in TCP_BIND.findall(config)}


class FactFinder:
    def __init__(
        self, settings: RenderSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.resolver = Resolver(clock=clock)
        self._local: dict[str, bool] = {}  # IP -> this host's own (kept for a resolver TTL)
        self._local_at = 0.0
        self._watched: set[int] = set()  # the ports the kept hosts were judged against
        # service -> (its object, its host names, its IPs on a watched port)
        self._hosts: dict[str, tuple[Service, frozenset[str], frozenset[str]]] = {}
        self._seen: Snapshot | None = None  # what `_hosts` was made from
        self._union: tuple[frozenset[str], frozenset[str]] | None = None  # of `_hosts`
        self._tcp: tuple[Snapshot, set[int]] | None = None  # the TCP ports of a layout

    async def find(
        self, snapshot: Snapshot, live: Model | None, held: AbstractSet[int] = frozenset()
    ) -> HostFacts:
        """`live`: the model HAProxy runs; `held`: TCP ports this edge's HAProxy binds
        when that model is unknown (a previous run's config)."""
        rs = self.settings
        own = set(own_ports(rs, live.https_bind if live else None))
        if self._tcp is None or not snapshot.same_layout(self._tcp[0]):
            ports = {s.spec.port for s in snapshot.services.values() if s.spec.mode == "tcp"}
            self._tcp = (snapshot, {p for p in ports if p})
        tcp = self._tcp[1]
        watched = own | tcp | {p for _, p in rs.targets.etcd}
        # Each service's hosts are worked out again only when its object changed (the
        # catalog keeps an unchanged service's object), and the union of them all only
        # when one service's differ: the cost follows the change.
        if watched != self._watched:
            self._hosts.clear()
            self._seen = None
            self._watched = watched
        moved = self._union is None
        for name in changed_services(self._seen, snapshot):
            old = self._hosts.pop(name, None)
            svc = snapshot.services.get(name)
            if svc is not None:
                kept = self._hosts[name] = (svc, *_hosts_of(svc, watched))
                moved = moved or old is None or old[1:] != kept[1:]
            else:
                moved = moved or old is None or bool(old[1] or old[2])
        self._seen = snapshot
        if moved:
            all_names = set().union(*(h[1] for h in self._hosts.values()))
            all_ips = set().union(*(h[2] for h in self._hosts.values()))
            self._union = (frozenset(all_names), frozenset(all_ips))
        assert self._union is not None
        names = self._union[0] | {h for h, _ in rs.targets.etcd if not is_ip(h)}
        ips = set(self._union[1])
        addresses = await self.resolver.resolve(names)
        ips |= {ip for ip in addresses.values() if ip is not None}
        now = self.clock()
        if now - self._local_at > self.resolver.ttl:
            self._local.clear()
            self._local_at = now
        unknown = {ip for ip in ips if ip not in self._local}
        found = local_addresses(unknown)
        self._local.update({ip: ip in found for ip in unknown})
        # Ports our own HAProxy holds for the live config are ours to keep.
        held = {r.port for r in live.tcp_routes if r.port} if live else set(held)
        busy = {}
        for port in sorted(tcp - held - own):
            holder = port_holder(rs.http_bind[0], port)
            if holder is not None:
                busy[port] = holder
        return HostFacts(
            addresses=addresses,
            local=frozenset(ip for ip, mine in self._local.items() if mine),
            busy_ports=busy,
        )


def _hosts_of(svc: Service, watched: AbstractSet[int]) -> tuple[frozenset[str], frozenset[str]]:
    """A service's instance host names (to resolve), and its IP hosts on a port in
    `watched` (to ask whether they are this host's own)."""
    names: set[str] = set()
    ips: set[str] = set()
    for inst in svc.instances.values():
        if not is_ip(inst.host):
            names.add(inst.host)
        elif inst.port in watched:
            ips.add(inst.host)
    return frozenset(names), frozenset(ips)


class Reporter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.skips: set[Skip] = set()
        self.fallbacks: dict[str, str] = {}  # service -> the version served in its place
        self.counts: dict[str, int] = {}  # skip kind -> times something was left out
        self.recheck_at: float | None = None
        self._seen: Snapshot | None = None  # what `_fallback` was judged on
        self._fallback: dict[str, str] = {}  # service -> the version served in its place

    def report(self, model: Model, snapshot: Snapshot, resolver: Resolver) -> None:
        now = set(model.skipped)
        for skip in sorted(now - self.skips, key=str):
            self.counts[skip.kind] = self.counts.get(skip.kind, 0) + 1
            log.warning(
                "left out of the config",
                service=skip.service,
                instance=skip.instance,
                kind=skip.kind,
                reason=skip.reason,
                revision=snapshot.revision,
            )
        for skip in sorted(self.skips - now, key=str):
            if skip.service in snapshot.services:
                log.info(
                    "back in the config",
                    service=skip.service,
                    instance=skip.instance,
                    revision=snapshot.revision,
                )
        self.skips = now
        # The policy is looked at again only for services whose object changed (the
        # catalog keeps an unchanged service's object): the cost follows the change.
        for name in changed_services(self._seen, snapshot):
            svc = snapshot.services.get(name)
            fallback = routing.routing(svc).fallback if svc is not None else None
            if fallback is None:
                self._fallback.pop(name, None)
            else:
                self._fallback[name] = fallback
        self._seen = snapshot
        fallbacks = dict(self._fallback)
        for name, version in sorted(fallbacks.items()):
            if self.fallbacks.get(name) != version:
                log.warning(
                    "active version has no instance up: serving another version until it has",
                    service=name,
                    active_version=snapshot.services[name].spec.active_version,
                    serving_version=version,
                    revision=snapshot.revision,
                )
        for name in sorted(self.fallbacks.keys() - fallbacks.keys()):
            log.info("fallback over", service=name, revision=snapshot.revision)
        self.fallbacks = fallbacks
        transient = any(s.kind in ("port", "dns") for s in now)
        times = [resolver.next_refresh(), self.clock() + RECHECK if transient else None]
        self.recheck_at = min((t for t in times if t is not None), default=None)

    def due(self) -> bool:
        return self.recheck_at is not None and self.clock() >= self.recheck_at
