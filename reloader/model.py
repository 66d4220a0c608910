"""The routing model: a catalog Snapshot turned into frontends, backends and servers.

Templates only ever see this model, never raw records, so every decision about what
HAProxy gets (which instances route, canary split, names, ordering) is made here in
plain Python where it is testable. The model is a pure function of the snapshot and
the settings; building it twice gives equal models, which is what makes rendering
byte-identical for the same catalog.

Server names are the instance names (the last part of the etcd key): they are unique
within a service, stable across reloads, and a character set HAProxy accepts as-is.
That stability is what lets the runtime API (add/del server by name) and the config
file describe the same servers, so a reload reproduces what the runtime API did.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, NamedTuple

from fluster import routing
from fluster.catalog import Service, Snapshot, changed_services
from fluster.records import Instance
from reloader.state_dir import StateDir
from reloader.targets import HostFacts, TargetPolicy, target_problem

# Balance algorithms that accept dynamic servers and runtime weight changes.
DYNAMIC_BALANCES: Final = frozenset({"roundrobin", "leastconn", "first", "random"})
# Everything printed into haproxy.cfg is re-checked against this, whatever the records
# module let through: a second lock on the door, because a bad line takes down routing.
SAFE_TOKEN: Final = re.compile(r"[A-Za-z0-9._:/%~+=&?\[\]*-]{1,253}")


class ModelError(ValueError):
    """A value that must never be printed into haproxy.cfg reached the model."""


def safe(value: str) -> str:
    if not _is_safe(value):
        raise ModelError(f"refusing to render {value[:80]!r}")
    return value


@functools.lru_cache(maxsize=1 << 16)
def _is_safe(value: str) -> bool:
    """Memoized: every change re-checks the names and addresses of the changed service."""
    return SAFE_TOKEN.fullmatch(value) is not None


def format_bind(host: str, port: int) -> str:
    """HAProxy bind syntax: `*:80`, `127.0.0.1:80`, `::1:80` (last colon is the port)."""
    return f"{safe(host) if host else '*'}:{port}"


SKIP_KINDS: Final = ("port", "host", "target", "dns", "render")


@dataclass(frozen=True, slots=True)
class Skip:
    """A service (or one instance of it) left out of the config, and why."""

    service: str
    kind: str  # one of SKIP_KINDS
    reason: str
    instance: str | None = None

    def __str__(self) -> str:
        who = f"{self.service}/{self.instance}" if self.instance else self.service
        return f"{who}: {self.reason}"

    def as_dict(self) -> dict[str, str]:
        out = {"service": self.service, "kind": self.kind, "reason": self.reason}
        if self.instance:
            out["instance"] = self.instance
        return out


# Empty HTTP backends kept ready (RELOADER_HTTP_POOL): the one declaration of the default.
POOL_SIZE: Final = 16


@dataclass(frozen=True, slots=True)
class RenderSettings:
    """What the config depends on besides the catalog."""

    state_dir: Path = Path("/var/lib/reloader")
    http_bind: tuple[str, int] = ("", 80)
    # The socket the reloader holds on `http_bind` (reloader/listener.py), which HAProxy
    # inherits as `fd@N`; None: HAProxy binds `http_bind` itself (`render --once`).
    http_fd: int | None = None
    domain: str = "localhost"
    stats_bind: tuple[str, int] | None = None
    stats_auth: str = field(default="", repr=False)  # USER:PASSWORD when not on loopback
    status_bind: tuple[str, int] | None = None  # the reloader's own, never a target
    targets: TargetPolicy = field(default_factory=TargetPolicy)
    hard_stop_after_s: int = 60
    max_reloads: int = 50
    maxconn: int | None = None  # None: HAProxy derives it from the file descriptor limit
    # The HTTPS frontend's address (None: never). Unless `https_always`, it binds only
    # once a certificate exists, so an edge without certificates listens on HTTP alone.
    https_bind: tuple[str, int] | None = ("", 443)
    https_always: bool = False
    pool_size: int = POOL_SIZE  # empty HTTP backends a new service can take without a reload
    # Where HAProxy sends /.well-known/acme-challenge/ (the reloader's status address),
    # when this edge obtains certificates by ACME.
    acme_backend: tuple[str, int] | None = None

    @property
    def files(self) -> StateDir:
        """The state directory's files; the template prints a few of them."""
        return StateDir(self.state_dir)

    @property
    def admin_socket(self) -> Path:
        return self.files.admin_socket

    @property
    def server_state_file(self) -> Path:
        return self.files.server_state

    @property
    def routes_map(self) -> Path:
        return self.files.routes_map

    # HTTPS state lives beside the config, not in it (reloader.certs keeps these files
    # and HAProxy's memory in step through the runtime API): a certificate or a policy
    # change never changes haproxy.cfg, so it never costs a reload.
    @property
    def tls_dir(self) -> Path:
        return self.files.tls_dir

    @property
    def default_cert(self) -> Path:
        return self.files.default_cert

    @property
    def crt_list(self) -> Path:
        return self.files.crt_list

    @property
    def https_map(self) -> Path:
        return self.files.https_map

    @property
    def hsts_map(self) -> Path:
        return self.files.hsts_map


# Every server is observed by HAProxy: its first refused or failed connection takes it
# out of rotation (the request is retried on another, see defaults.j2), so a process that
# died before its record went costs no request. The active check brings it back (every
# FAST_CHECK_MS while down) and, for a server without a spec check, runs rarely otherwise.
CHECK_INTER_MS: Final = 30_000
FAST_CHECK_MS: Final = 500
OBSERVE: Final = (
    f"fastinter {FAST_CHECK_MS} downinter {FAST_CHECK_MS} rise 2 fall 2 "
    "observe layer4 error-limit 1 on-error mark-down"
)


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    host: str
    port: int
    weight: int
    check_inter_ms: int | None = None  # the spec's check; None: CHECK_INTER_MS

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def options(self) -> str:
        """Everything after the address; the runtime API's `add server` uses the same."""
        inter = self.check_inter_ms or CHECK_INTER_MS
        return f"weight {self.weight} check inter {inter} {OBSERVE}"

    @property
    def line(self) -> str:
        return f"{self.name} {self.address} {self.options}"


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    service: str
    mode: str
    balance: str
    check_path: str | None = None
    servers: tuple[Server, ...] = ()  # sorted by name (see _servers); plans rely on it

    @property
    def dynamic(self) -> bool:
        """Whether servers can be added, removed and re-weighted without a reload."""
        return self.balance in DYNAMIC_BALANCES


@dataclass(frozen=True, slots=True)
class Canary:
    backend: str
    weight: int  # percent of requests/connections


@dataclass(frozen=True, slots=True)
class Route:
    """How traffic reaches one service: by Host (+ path) on the HTTP frontend, or a port."""

    service: str
    backend: str
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"
    port: int | None = None
    canary: Canary | None = None


@dataclass(frozen=True, slots=True)
class Model:
    settings: RenderSettings
    http_routes: tuple[Route, ...] = ()
    tcp_routes: tuple[Route, ...] = ()
    backends: tuple[Backend, ...] = ()
    skipped: tuple[Skip, ...] = ()  # services and instances left out, with the reason
    https_bind: tuple[str, int] | None = None  # the HTTPS frontend, when it is on

    def without_servers(self) -> Model:
        """The same model with every backend emptied."""
        return replace(self, backends=tuple(replace(b, servers=()) for b in self.backends))

    def frame_key(self) -> tuple[object, ...]:
        """Everything the templates see but the servers (cheaper than without_servers)."""
        return (
            self.settings,
            self.https_bind,
            self.http_routes,
            self.tcp_routes,
            self.skipped,
            tuple((b.name, b.service, b.mode, b.balance, b.check_path) for b in self.backends),
        )

    def structure(self) -> tuple[object, ...]:
        """What only a reload can change: two models with equal structures differ in
        servers and routes map entries only, which the runtime API can apply. (The
        templates print routes through the map, and servers as `server.line`.)"""
        return (
            self.settings,
            self.https_bind,
            self.tcp_routes,
            tuple((r.backend, r.canary) for r in self.http_routes if r.canary),
            tuple((b.name, b.mode, b.balance, b.check_path) for b in self.backends),
        )

    @property
    def server_count(self) -> int:
        return sum(len(b.servers) for b in self.backends)

    def backend_map(self) -> dict[str, Backend]:
        return {b.name: b for b in self.backends}

    def route_entries(self) -> tuple[tuple[str, str], ...]:
        """The HTTP routing table as (key, backend) pairs, sorted by key.

        The frontend looks up `host + path + "/"` with `map_beg`, which HAProxy keeps in
        a prefix tree and answers with the longest matching key: one lookup whatever the
        number of services, and the longest path prefix wins. A key ends in "/" so that
        the prefix /api matches /api and /api/x but not /apix. For a host and prefix
        claimed twice, the first route in `http_routes` order keeps it.
        """
        table: dict[str, str] = {}
        for route in self.http_routes:
            for host in route.hosts:
                table.setdefault(route_key(host, route.path_prefix), route.backend)
        return tuple(sorted(table.items()))

    def routes_text(self) -> str:
        return "".join(f"{key} {backend}\n" for key, backend in self.route_entries())


def with_servers_of(live: Model, target: Model) -> Model:
    """`live`'s structure with `target`'s servers for the backends both have.

    When HAProxy refuses a structural change (say a TCP port another process holds),
    the membership changes of every other service can still be applied on the live
    structure, so one bad spec does not freeze the whole edge.
    """
    servers = {b.name: b.servers for b in target.backends}
    return replace(
        live,
        backends=tuple(replace(b, servers=servers.get(b.name, b.servers)) for b in live.backends),
    )


def host_header(host: str) -> str:
    """How `host` appears in a Host header once the port is gone: IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host


def route_key(host: str, path_prefix: str) -> str:
    """The routes map key of a host and path prefix (see `Model.route_entries`)."""
    path = path_prefix if path_prefix.endswith("/") else path_prefix + "/"
    return safe(host_header(host).lower() + path)


def backend_name(service: str, canary: bool = False) -> str:
    return f"be_{service}_canary" if canary else f"be_{service}"


POOL_PREFIX: Final = "pool_"  # service backends start with "be_": no name can collide
POOL_BALANCE: Final = "roundrobin"


@functools.lru_cache(maxsize=8)
def pool_backends(size: int) -> tuple[Backend, ...]:
    """The empty HTTP backends a new service can take (see reloader/pool.py); the same
    objects at every build, so that comparing models compares them by identity."""
    return tuple(Backend(f"{POOL_PREFIX}{i}", "", "http", POOL_BALANCE) for i in range(size))


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


def own_ports(
    settings: RenderSettings, https_bind: tuple[str, int] | None = None
) -> dict[int, str]:
    """The ports the edge itself listens on, and what listens there."""
    own = {settings.http_bind[1]: "HTTP frontend"}
    if https_bind:
        own.setdefault(https_bind[1], "HTTPS frontend")
    if settings.stats_bind:
        own.setdefault(settings.stats_bind[1], "HAProxy stats page")
    if settings.status_bind:
        own.setdefault(settings.status_bind[1], "reloader status page")
    return own


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


@functools.lru_cache(maxsize=1 << 16)
def is_ip(host: str) -> bool:
    """Memoized: every apply asks it for every instance of the catalog."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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
        changed = changed_services(before.services, snapshot.services)
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
