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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from reloader.haproxy import CliSession, HaproxyError
from reloader.model import Backend, Model, Server

log = structlog.get_logger("reloader.runtime_api")

Exchange = Callable[[Sequence[str]], Awaitable[list[str]]]


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


@dataclass(frozen=True, slots=True)
class _Command:
    """One CLI command and what its reply must start with (`accepted`, "" for an empty
    reply), or a function that judges the reply itself (`then`)."""

    text: str
    accepted: tuple[str, ...] = ("",)
    then: Callable[[str], None] | None = None


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
        self._exchange: Exchange = self._closed
        self.pending_deletes: set[tuple[str, str]] = set()
        self.connects = 0  # admin connections opened (one per reload, not per change)
        self._session: CliSession | None = None
        self._used = 0.0  # clock() at the end of the session's last batch
        self._clock = clock

    @staticmethod
    async def _closed(commands: Sequence[str]) -> list[str]:
        raise RuntimeApiError(f"no session for {commands[0]!r}")

    async def _batch(self, work: Callable[[], Awaitable[None]]) -> None:
        session = self._session
        if session is None or not session.usable or self._clock() - self._used > self.KEEP_IDLE:
            self._let_go()
            session = await CliSession(self.socket).open()
            self._session = session
            self.connects += 1
        self._exchange = session.exchange
        try:
            await work()
        except BaseException:
            self._let_go()  # whatever broke may have broken the connection with it
            raise
        finally:
            self._exchange = self._closed
            self._used = self._clock()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _let_go(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.abort()

    async def _run(self, commands: list[_Command]) -> None:
        """Send `commands` in one exchange, then judge the replies in order: the first
        unexpected one raises (HAProxy ran the rest anyway; the caller's reload of the
        whole validated config repairs that)."""
        if not commands:
            return
        replies = await self._exchange([c.text for c in commands])
        for command, reply in zip(commands, replies, strict=True):
            if command.then is not None:
                command.then(reply)
            else:
                _expect(reply, command.text, *command.accepted)

    async def apply(self, changes: Plan) -> None:
        await self._batch(lambda: self._apply(changes))

    async def _apply(self, changes: Plan) -> None:
        await self._run(self._retries())  # first: a re-added server may be one of them
        # Two round trips. Additions first: when a promotion swaps every server of a
        # backend, removing first leaves it empty for a moment and requests get 503 (the
        # few milliseconds a lost instance keeps its slot are covered by HAProxy's
        # redispatch). Removals only once every addition was accepted, so that a
        # refused one never leaves a backend emptied until the reload that repairs it.
        first: list[_Command] = []
        for backend, server in changes.add:
            ref = f"{backend}/{server.name}"
            if (backend, server.name) in self.pending_deletes:
                # Still there in maintenance: bring it back with its new settings.
                self.pending_deletes.discard((backend, server.name))
                first += self._update(backend, server)
                first.append(_Command(f"set server {ref} state ready"))
                continue
            first += [
                _Command(
                    f"add server {ref} {server.address} {server.options}",
                    ("New server registered.",),
                ),
                _Command(f"enable health {ref}"),
                _Command(f"enable server {ref}"),
            ]
        for backend, _old, new in changes.update:
            first += self._update(backend, new)
        # Routes after the servers they lead to, and before the servers they led to go.
        first += [_Command(f"add map {self.routes_map} {k} {b}") for k, b in changes.route_add]
        first += [_Command(f"set map {self.routes_map} {k} {b}") for k, b in changes.route_set]
        await self._run(first)
        second = [
            _Command(f"del map {self.routes_map} {key}", ("", "Key not found."))
            for key in changes.route_del
        ]
        for backend, name in changes.delete:
            second += [
                _Command(f"set server {backend}/{name} state maint"),
                self._delete(backend, name),
            ]
        await self._run(second)

    @staticmethod
    def _update(backend: str, server: Server) -> list[_Command]:
        ref = f"{backend}/{server.name}"
        return [
            _Command(
                f"set server {ref} addr {server.host} port {server.port}",
                ("IP changed from", "no need to change", "port changed from"),
            ),
            _Command(f"set server {ref} weight {server.weight}"),
        ]

    def _delete(self, backend: str, name: str) -> _Command:
        def judge(reply: str) -> None:
            text = reply.strip()
            if text.startswith("Server deleted.") or text.startswith("No such server"):
                self.pending_deletes.discard((backend, name))
                return
            log.info(
                "server still busy, left in maintenance",
                backend=backend,
                server=name,
                reply=text[:200],
            )
            self.pending_deletes.add((backend, name))

        return _Command(f"del server {backend}/{name}", then=judge)

    async def retry_pending(self) -> None:
        if self.pending_deletes:
            await self._batch(lambda: self._run(self._retries()))

    def _retries(self) -> list[_Command]:
        return [self._delete(backend, name) for backend, name in sorted(self.pending_deletes)]

    def forget(self) -> None:
        """After a reload or restart HAProxy has only what the config file says, and the
        kept connection talks to a worker that is leaving (or gone)."""
        self.pending_deletes.clear()
        self._let_go()
