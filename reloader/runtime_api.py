"""Server and route changes through HAProxy's runtime API, without a reload.

`plan()` decides whether a change can go this way at all: the config structure must be
identical (see `Model.structure` and reloader/pool.py) and every difference must be one
the API can make (add, delete, address/port, weight) on a backend whose balance algorithm
accepts dynamic servers, or a routes map entry (`add map`, `set map`, `del map`).
Anything else returns None and the caller reloads.

Every reply is checked against what HAProxy says on success; an unexpected reply raises
and the caller falls back to a reload of the (already validated) config file, which
describes the target state and so repairs whatever half-applied state we left.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from reloader.haproxy import CliSession, HaproxyError
from reloader.model import Backend, Model, Server

log = structlog.get_logger("reloader.runtime_api")

Send = Callable[[str], Awaitable[str]]


class RuntimeApiError(HaproxyError):
    pass


@dataclass
class Plan:
    """The changes to make: servers to add, delete and update per backend, and routes
    map entries (key -> backend) to add, repoint and remove."""

    add: list[tuple[str, Server]] = field(default_factory=list)
    delete: list[tuple[str, str]] = field(default_factory=list)
    update: list[tuple[str, Server, Server]] = field(default_factory=list)
    route_add: list[tuple[str, str]] = field(default_factory=list)
    route_set: list[tuple[str, str]] = field(default_factory=list)
    route_del: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.size > 0

    @property
    def size(self) -> int:
        servers = len(self.add) + len(self.delete) + len(self.update)
        return servers + len(self.route_add) + len(self.route_set) + len(self.route_del)


def plan(live: Model, target: Model) -> Plan | None:
    """The runtime changes that turn `live` into `target`, or None if a reload is needed.

    The caller has already established that both configs have the same structure.
    """
    live_backends, target_backends = live.backend_map(), target.backend_map()
    if live_backends.keys() != target_backends.keys():
        return None
    result = Plan()
    for name, want in target_backends.items():
        if not server_changes(live_backends[name], want, result):
            return None
    if live.http_routes == target.http_routes:
        return result
    old_routes, new_routes = dict(live.route_entries()), dict(target.route_entries())
    for key, backend in new_routes.items():
        if key not in old_routes:
            result.route_add.append((key, backend))
        elif old_routes[key] != backend:
            result.route_set.append((key, backend))
    result.route_del.extend(k for k in old_routes if k not in new_routes)
    return result


def server_changes(have: Backend, want: Backend, result: Plan) -> bool:
    """Add to `result` what turns `have`'s servers into `want`'s (one backend, one
    name); False if that takes a reload."""
    if have.servers == want.servers:
        return True  # most backends, most of the time: one tuple comparison
    delete, add, update = _walk(have.servers, want.servers)
    if not (delete or add or update):
        return True
    if not want.dynamic:
        return False
    if any(a.check_inter_ms != b.check_inter_ms for a, b in update):
        return False  # check settings cannot change at runtime
    name = want.name
    result.delete.extend((name, s) for s in delete)
    result.add.extend((name, s) for s in add)
    result.update.extend((name, a, b) for a, b in update)
    return True


Diff = tuple[list[str], list[Server], list[tuple[Server, Server]]]  # delete, add, update


def _walk(old: tuple[Server, ...], new: tuple[Server, ...]) -> Diff:
    """The difference of two server lists sorted by name (`Backend.servers` always
    is), in one pass that steps over a server kept as the same object: a backend of
    1,000 servers that gains one costs pointer comparisons, not two dicts of 1,000."""
    delete: list[str] = []
    add: list[Server] = []
    update: list[tuple[Server, Server]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        a, b = old[i], new[j]
        if a is b:
            i, j = i + 1, j + 1
        elif a.name == b.name:
            if a != b:
                update.append((a, b))
            i, j = i + 1, j + 1
        elif a.name < b.name:
            delete.append(a.name)
            i += 1
        else:
            add.append(b)
            j += 1
    delete.extend(s.name for s in old[i:])
    add.extend(new[j:])
    return delete, add, update


def _expect(reply: str, command: str, *accepted: str) -> None:
    text = reply.strip()
    if text == "" and "" in accepted:
        return
    if any(a and text.startswith(a) for a in accepted):
        return
    raise RuntimeApiError(f"{command!r} -> {text[:200]!r}")


class RuntimeApi:
    """Applies a Plan over the admin socket. Deletions that HAProxy refuses (a server
    still holding connections) are left in maintenance, which takes no new traffic, and
    retried on the next apply.

    One admin connection is kept from batch to batch (connecting cost a third of a
    millisecond per change: docs/BENCHMARKS.md, P10). It is let go, so that the next
    batch connects afresh, whenever it could be talking to a worker that no longer
    serves: after every reload and restart (`forget()`: the old worker keeps the old
    connection while it finishes), after any error in a batch, when HAProxy closed its
    side, and when it sat idle for KEEP_IDLE (HAProxy's `stats timeout` is 30 s)."""

    KEEP_IDLE = 20.0

    def __init__(
        self, socket: Path, routes_map: Path, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.socket = socket
        self.routes_map = routes_map
        self.send: Send = self._closed
        self.pending_deletes: set[tuple[str, str]] = set()
        self.connects = 0  # admin connections opened (one per reload, not per change)
        self._session: CliSession | None = None
        self._used = 0.0  # clock() at the end of the session's last batch
        self._clock = clock

    @staticmethod
    async def _closed(command: str) -> str:
        raise RuntimeApiError(f"no session for {command!r}")

    async def _batch(self, work: Callable[[], Awaitable[None]]) -> None:
        session = self._session
        if session is None or not session.usable or self._clock() - self._used > self.KEEP_IDLE:
            self._let_go()
            session = await CliSession(self.socket).open()
            self._session = session
            self.connects += 1
        self.send = session.send
        try:
            await work()
        except BaseException:
            self._let_go()  # whatever broke may have broken the connection with it
            raise
        finally:
            self.send = self._closed
            self._used = self._clock()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _let_go(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.abort()

    async def run(self, command: str, *accepted: str) -> None:
        _expect(await self.send(command), command, *accepted)

    async def apply(self, changes: Plan) -> None:
        await self._batch(lambda: self._apply(changes))

    async def _apply(self, changes: Plan) -> None:
        await self._retry_pending()
        # Additions before removals: when a promotion swaps every server of a backend,
        # removing first leaves it empty for a moment and requests get 503. The few
        # milliseconds a lost instance keeps its slot are covered by HAProxy's redispatch.
        for backend, server in changes.add:
            if (backend, server.name) in self.pending_deletes:
                # Still there in maintenance: bring it back with its new settings.
                self.pending_deletes.discard((backend, server.name))
                await self.update(backend, server)
                await self.run(f"set server {backend}/{server.name} state ready", "")
                continue
            await self.run(
                f"add server {backend}/{server.name} {server.address} {server.options}",
                "New server registered.",
            )
            await self.run(f"enable health {backend}/{server.name}", "")
            await self.run(f"enable server {backend}/{server.name}", "")
        for backend, _old, new in changes.update:
            await self.update(backend, new)
        # Routes after the servers they lead to, and before the servers they led to go.
        for key, backend in changes.route_add:
            await self.run(f"add map {self.routes_map} {key} {backend}", "")
        for key, backend in changes.route_set:
            await self.run(f"set map {self.routes_map} {key} {backend}", "")
        for key in changes.route_del:
            await self.run(f"del map {self.routes_map} {key}", "", "Key not found.")
        for backend, name in changes.delete:
            await self.run(f"set server {backend}/{name} state maint", "")
            await self.delete(backend, name)

    async def update(self, backend: str, server: Server) -> None:
        ref = f"{backend}/{server.name}"
        await self.run(
            f"set server {ref} addr {server.host} port {server.port}",
            "IP changed from",
            "no need to change",
            "port changed from",
        )
        await self.run(f"set server {ref} weight {server.weight}", "")

    async def delete(self, backend: str, name: str) -> bool:
        reply = (await self.send(f"del server {backend}/{name}")).strip()
        if reply.startswith("Server deleted.") or reply.startswith("No such server"):
            self.pending_deletes.discard((backend, name))
            return True
        log.info(
            "server still busy, left in maintenance",
            backend=backend,
            server=name,
            reply=reply[:200],
        )
        self.pending_deletes.add((backend, name))
        return False

    async def retry_pending(self) -> None:
        if self.pending_deletes:
            await self._batch(self._retry_pending)

    async def _retry_pending(self) -> None:
        for backend, name in sorted(self.pending_deletes):
            await self.delete(backend, name)

    def forget(self) -> None:
        """After a reload or restart HAProxy has only what the config file says, and the
        kept connection talks to a worker that is leaving (or gone)."""
        self.pending_deletes.clear()
        self._let_go()
