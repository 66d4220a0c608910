"""Building the routing model (reloader/model.py) from a catalog Snapshot.

`build_model` decides, service by service, which instances route and how (targets the
edge may reach, TCP ports, host claims, canary split), leaving out one service or one
instance with a reason, never the whole config. `ServiceCache` makes a change of one
service cost that service's work: it reuses each unchanged service's piece of the last
model and, when only servers changed, makes the next model from the last one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import NamedTuple

from fluster import routing
from fluster.catalog import Service, Snapshot, changed_services
from fluster.records import Instance
from reloader.model import (
    Backend,
    Canary,
    Model,
    ModelError,
    RenderSettings,
    Route,
    Server,
    Skip,
    backend_name,
    is_ip,
    own_ports,
    pool_backends,
    safe,
)
from reloader.targets import HostFacts, TargetPolicy, target_problem

# (instance name, id of its Instance) -> (the Instance, check interval, its Server)
ServerMemo = dict[tuple[str, int], tuple[Instance, "int | None", Server]]


def _servers(
    instances: Mapping[str, Instance], check_ms: int | None, memo: ServerMemo | None = None
) -> tuple[Server, ...]:
    """The servers of `instances`. `memo` keeps each instance's Server while the catalog
    keeps its Instance object: a backend of 1,000 servers that gains one makes one."""
    if memo is None:
        memo = {}
    out: list[Server] = []
    for name, inst in sorted(instances.items()):
        kept = memo.get((name, id(inst)))
        if kept is None or kept[0] is not inst or kept[1] != check_ms:
            server = Server(safe(name), safe(inst.host), inst.port, inst.weight, check_ms)
            kept = memo[(name, id(inst))] = (inst, check_ms, server)
        out.append(kept[2])
    return tuple(out)


def _service(
    svc: Service,
    settings: RenderSettings,
    usable: dict[str, Instance],
    fallback: str | None,
    servers: ServerMemo | None = None,
) -> tuple[Route, list[Backend]]:
    """`usable`: the instances routing sends traffic to that passed the target checks,
    hosts resolved; `fallback`: the version serving in place of the active one."""
    spec = svc.spec
    check_ms = spec.check.interval_ms if spec.check else None
    check_path = safe(spec.check.path) if spec.check and spec.mode == "http" else None
    canary = spec.canary
    split = (
        fallback is None
        and canary is not None
        and canary.weight > 0
        and spec.active_version is not None
        and canary.version != spec.active_version
    )
    main = {n: i for n, i in usable.items() if not split or i.version == spec.active_version}

    def backend(name: str, instances: dict[str, Instance]) -> Backend:
        return Backend(
            name,
            svc.name,
            spec.mode,
            spec.balance,
            check_path,
            _servers(instances, check_ms, servers),
        )

    backends = [backend(backend_name(svc.name), main)]
    route_canary = None
    if split:
        assert canary is not None
        rest = {n: i for n, i in usable.items() if n not in main}
        backends.append(backend(backend_name(svc.name, canary=True), rest))
        route_canary = Canary(backend_name(svc.name, canary=True), canary.weight)
    route = Route(
        service=svc.name,
        backend=backend_name(svc.name),
        hosts=tuple(safe(h) for h in routing.hosts(svc, settings.domain)),
        path_prefix=safe(spec.path_prefix),
        port=spec.port if spec.mode == "tcp" else None,
        canary=route_canary,
    )
    return route, backends


def _tcp_ports(
    services: list[Service], own: Mapping[int, str], facts: HostFacts
) -> tuple[dict[str, int], list[Skip]]:
    """TCP service -> its port; the older spec (lower create revision) keeps a port two
    ask for, and a port the edge or another process holds is refused."""
    taken = {port: f"this edge's {what}" for port, what in own.items()}
    granted: dict[str, int] = {}
    skipped: list[Skip] = []
    for svc in sorted(services, key=lambda s: (s.spec_created or float("inf"), s.name)):
        port = svc.spec.port
        assert port is not None  # ServiceSpec requires it in tcp mode
        holder = taken.get(port) or facts.busy_ports.get(port)
        if holder is not None:
            skipped.append(Skip(svc.name, "port", f"port {port}: {holder}"))
            continue
        taken[port] = f"service {svc.name}, whose spec is older"
        granted[svc.name] = port
    return granted, skipped


Verdict = tuple[str | None, str, str]  # (ip or None, skip kind, why) for one host:port


def _target(
    host: str, port: int, policy: TargetPolicy, facts: HostFacts, tcp_ports: Iterable[int]
) -> Verdict:
    """Where `host`:`port` may be sent traffic: its IP, or None with the skip's kind and why."""
    ip: str | None = host
    if not is_ip(host):
        ip = facts.addresses.get(host)
        if ip is None:
            return None, "dns", f"host name {host} does not resolve"
    assert ip is not None
    problem = target_problem(ip, port, policy, facts, tcp_ports)
    if problem is not None:
        return None, "target", problem
    return ip, "", ""


def _usable(
    svc: Service,
    instances: Mapping[str, Instance],
    policy: TargetPolicy,
    facts: HostFacts,
    tcp_ports: Iterable[int],
    skipped: list[Skip],
    memo: dict[tuple[str, int], Verdict] | None = None,
) -> dict[str, Instance]:
    """`instances` with resolved addresses, minus the ones that must not be targets.
    `memo` keeps each host:port's verdict for a build context (see ServiceCache), so a
    service of 1,000 instances that gains one does not parse 1,000 addresses again."""
    memo = {} if memo is None else memo
    out: dict[str, Instance] = {}
    for name, inst in instances.items():
        verdict = memo.get((inst.host, inst.port))
        if verdict is None:
            verdict = memo[(inst.host, inst.port)] = _target(
                inst.host, inst.port, policy, facts, tcp_ports
            )
        ip, kind, why = verdict
        if ip is None:
            skipped.append(Skip(svc.name, kind, why, name))
            continue
        out[name] = inst if ip == inst.host else replace(inst, host=ip)
    return out


Piece = tuple["Route | None", tuple["Backend", ...], tuple[Skip, ...]]


def _piece(
    svc: Service,
    settings: RenderSettings,
    policy: TargetPolicy,
    facts: HostFacts,
    ports: Mapping[str, int],
    memo: dict[tuple[str, int], Verdict] | None = None,
    servers: ServerMemo | None = None,
) -> Piece:
    """One service's route, backends and skips (route None: the service is left out)."""
    skips: list[Skip] = []
    decided = routing.routing(svc)
    try:
        usable = _usable(svc, decided.instances, policy, facts, ports.values(), skips, memo)
        route, svc_backends = _service(svc, settings, usable, decided.fallback, servers)
    except ModelError as exc:
        return None, (), (*skips, Skip(svc.name, "render", str(exc)))
    return route, tuple(svc_backends), tuple(skips)


class Last(NamedTuple):
    """A model and what it was built from (see ServiceCache.quick)."""

    model: Model
    snapshot: Snapshot
    key: object  # settings, target policy, host facts, HTTPS bind
    ports: dict[str, int]  # TCP service -> its port
    positions: dict[str, tuple[int, int]]  # service -> (its first backend's index, count)


class ServiceCache:
    """Each service's piece of the last model, reused while the service is the same
    object (the catalog keeps an unchanged service's object) and the build's context
    (settings, target policy, host facts, TCP ports) is equal: a membership change in
    one service then costs that service's work, not the whole catalog's (issue 15).

    It also keeps the last model and where each service's backends sit in it, so that
    a change that keeps the layout (see Snapshot.layout) and only changes the servers
    of a few services makes the next model from the last one (`quick`)."""

    def __init__(self) -> None:
        self.context: object = None
        self.pieces: dict[str, tuple[Service, Piece]] = {}
        self.verdicts: dict[tuple[str, int], Verdict] = {}  # host:port -> target verdict
        self.servers: ServerMemo = {}  # instance -> its Server
        self.ownership = routing.Ownership()  # who owns which host, kept between builds
        self.last: Last | None = None
        self.verdict_limit = 0  # more kept verdicts than this: clear them in a whole build
        self.quick_builds = 0  # how many models were made from the last one

    def begin(self, context: object) -> None:
        if context != self.context:
            self.pieces.clear()
            self.verdicts.clear()
            self.servers.clear()
            self.context = context

    def piece(self, svc: Service) -> Piece | None:
        kept = self.pieces.get(svc.name)
        return kept[1] if kept is not None and kept[0] is svc else None

    def keep(self, svc: Service, piece: Piece) -> None:
        self.pieces[svc.name] = (svc, piece)

    def retain(self, names: Iterable[str]) -> None:
        """Forget the services that are gone."""
        for name in self.pieces.keys() - set(names):
            del self.pieces[name]

    def quick(
        self,
        snapshot: Snapshot,
        key: object,
        settings: RenderSettings,
        policy: TargetPolicy,
        facts: HostFacts,
    ) -> Model | None:
        """The model for `snapshot` made from the last one, when only the servers of
        some services changed: the same layout (services and specs), the same build
        context, no host claim moved, and each changed service's route and skips as
        before with backends of the same names. None: build it whole."""
        if self.last is None or max(len(self.verdicts), len(self.servers)) > self.verdict_limit:
            return None
        model, before, last_key, ports, positions = self.last
        if key != last_key or not snapshot.same_layout(before):
            return None
        changed = changed_services(before, snapshot)
        services = [snapshot.services[name] for name in changed]
        http = [svc for svc in services if svc.spec.mode == "http"]
        if not self.ownership.same_stakes(http, settings.domain):
            return None
        backends = list(model.backends)
        for svc in services:
            at = positions.get(svc.name)
            old = self.pieces.get(svc.name)
            if at is None or old is None:
                if svc.spec.mode == "http" or svc.name in ports:
                    return None  # left out last time (a host claim, a render error)
                continue  # a TCP service without its port: still left out
            piece = _piece(svc, settings, policy, facts, ports, self.verdicts, self.servers)
            route, svc_backends, skips = piece
            _, (old_route, old_backends, old_skips) = old
            if route != old_route or skips != old_skips or len(svc_backends) != at[1]:
                return None
            if any(a.name != b.name for a, b in zip(svc_backends, old_backends, strict=True)):
                return None
            self.keep(svc, (old_route, svc_backends, old_skips))
            backends[at[0] : at[0] + at[1]] = svc_backends
        self.quick_builds += 1
        quick = replace(model, backends=tuple(backends))
        self.last = Last(quick, snapshot, key, ports, positions)
        return quick


def build_model(
    snapshot: Snapshot,
    settings: RenderSettings,
    facts: HostFacts | None = None,
    *,
    tls: bool = False,
    cache: ServiceCache | None = None,
) -> Model:
    """Snapshot + settings + host facts -> Model; deterministic, no I/O. `tls`: some
    certificate exists, which turns on an HTTPS frontend that waits for one.

    Every check here leaves out one service (or one instance) with a reason, never the
    whole config: a record can only ever affect its own service.
    """
    facts = facts or HostFacts()
    https_bind = settings.https_bind if tls or settings.https_always else None
    own = own_ports(settings, https_bind)
    policy = replace(settings.targets, own_ports=tuple(sorted(own.items())))
    key = (settings, policy, facts, https_bind)
    if cache is not None and (quick := cache.quick(snapshot, key, settings, policy, facts)):
        return quick
    services = list(snapshot.services.values())
    skipped: list[Skip] = []
    http_services = [s for s in services if s.spec.mode == "http"]
    if cache:
        losers = cache.ownership.conflicts(http_services, settings.domain)
    else:
        losers = routing.host_conflicts(http_services, settings.domain)
    ports, port_skips = _tcp_ports([s for s in services if s.spec.mode == "tcp"], own, facts)
    skipped.extend(port_skips)
    if cache:
        cache.begin((settings, policy, facts, tuple(sorted(ports.items()))))
    http: list[Route] = []
    tcp: list[Route] = []
    backends: list[Backend] = []
    positions: dict[str, tuple[int, int]] = {}
    for name, svc in sorted(snapshot.services.items()):
        if name in losers:
            skipped.append(Skip(name, "host", losers[name]))
            continue
        if svc.spec.mode == "tcp" and name not in ports:
            continue
        piece = cache.piece(svc) if cache else None
        if piece is None:
            memos = (cache.verdicts, cache.servers) if cache else (None, None)
            piece = _piece(svc, settings, policy, facts, ports, *memos)
            if cache:
                cache.keep(svc, piece)
        route, svc_backends, skips = piece
        skipped.extend(skips)
        if route is None:
            continue
        (tcp if route.port is not None else http).append(route)
        positions[name] = (len(backends), len(svc_backends))
        backends.extend(svc_backends)
    # Longest path prefix first: for a host and prefix claimed twice, the first keeps it.
    http.sort(key=lambda r: (-len(r.path_prefix), r.service))
    skipped.sort(key=lambda s: (s.service, s.instance or "", s.kind))
    backends.extend(pool_backends(settings.pool_size))
    if cache:
        cache.retain(snapshot.services)
        if len(cache.verdicts) > 4 * max(1, snapshot.instance_count):
            cache.verdicts.clear()  # addresses gone long ago
        if len(cache.servers) > 4 * max(1, snapshot.instance_count):
            cache.servers.clear()  # instances gone long ago
    model = Model(settings, tuple(http), tuple(tcp), tuple(backends), tuple(skipped), https_bind)
    if cache:
        cache.last = Last(model, snapshot, key, ports, positions)
        cache.verdict_limit = 8 * max(1, snapshot.instance_count)
    return model
