"""The routing model: a catalog Snapshot turned into frontends, backends and servers
(reloader/build.py builds it; this module holds its types and names).

Templates only ever see this model, never raw records, so every decision about what
HAProxy gets (which instances route, canary split, names, ordering) is made here and in
build.py, in plain Python where it is testable. The model is a pure function of the snapshot and
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from reloader.state_dir import StateDir
from reloader.targets import TargetPolicy

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


@functools.lru_cache(maxsize=1 << 16)
def is_ip(host: str) -> bool:
    """Memoized: every apply asks it for every instance of the catalog."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
