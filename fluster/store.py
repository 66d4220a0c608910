"""The one interface fluster has to etcd, whichever way it travels.

Everything in fluster sees `Store`, the records below and the few exceptions, never a
wire format. Two transports implement it (`open_store` picks one from the settings):

- gRPC (`fluster/store_grpc.py`): etcd's own protocol, one HTTP/2 channel to every
  member, long-lived lease and watch streams with progress requests. The reloader, the
  deployer and the CLI use it.
- HTTP (`fluster/store_http.py`): etcd's JSON gateway on the same port, over a small
  HTTP/1.1 client. It exists for the sidekick, which runs on every host beside the
  containers: without grpcio and protobuf a sidekick fits in 25 MB instead of 46.

Both give the same answers and raise the same exceptions; `tests/test_store.py` runs its
checks against both on a real etcd.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from fluster.channel import EtcdSettings
from fluster.runtime import Backoff

# The one retry policy for etcd calls that must eventually succeed (a record, a lease,
# a watch): back within a second of etcd being reachable again; after an AuthError,
# which wrong credentials or a missing role cause and which will not fix itself
# quickly, keep trying but do not hammer.
RETRY_CAP = 1.0
AUTH_RETRY_CAP = 10.0


class StoreError(Exception):
    """Base of every error the store raises."""


class Unavailable(StoreError):
    """etcd could not be reached or has no leader; retrying later may succeed."""


class AuthError(StoreError):
    """Wrong credentials or missing permission; retrying will not help."""


class Conflict(StoreError):
    """A compare-and-swap transaction lost: the key changed since it was read."""


class LeaseLost(StoreError):
    """The lease expired or was revoked; its keys are gone."""


class Compacted(StoreError):
    """The watch asked for history that etcd has compacted away: resync."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted up to {compact_revision}")
        self.compact_revision = compact_revision


class WatchRefused(StoreError):
    """The server cancelled or refused a watch (permission, bad request)."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int = 0
    create_revision: int = 0
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    type: Literal["put", "delete"]
    kv: KeyValue
    prev: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """Events of one watch response; `revision` is the store revision they bring us to."""

    revision: int
    events: tuple[Event, ...]


def prefix_end(prefix: bytes) -> bytes:
    """The exclusive range end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


# gRPC status codes (the same numbers etcd's JSON gateway reports).
CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 1, 2, 3, 4, 5
PERMISSION_DENIED, RESOURCE_EXHAUSTED, OUT_OF_RANGE, INTERNAL = 7, 8, 11, 13
UNAVAILABLE, UNAUTHENTICATED = 14, 16
_RETRYABLE = {CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE}


def error_for(code: int, detail: str, what: str) -> StoreError:
    """One of ours for etcd's status `code` and words, whichever transport brought them."""
    message = f"{what}: {detail}"
    if code in (UNAUTHENTICATED, PERMISSION_DENIED):
        return AuthError(message)
    if code == INVALID_ARGUMENT and "authentication failed" in detail:
        return AuthError(f"{what}: wrong user name or password")
    if code == NOT_FOUND and "lease" in detail:
        return LeaseLost(message)
    if code == OUT_OF_RANGE and "compacted" in detail:
        return Compacted(0)
    if code in _RETRYABLE:
        return Unavailable(message)
    return StoreError(message)


def watch_cancelled(prefix: str, reason: str) -> StoreError:
    """One of ours for a watch etcd cancelled or refused, by its reason."""
    reason = reason or "refused by the server"
    if "permission" in reason or "auth" in reason:
        return AuthError(f"watch {prefix}: {reason}")
    if "leader" in reason:
        return Unavailable(f"watch {prefix}: {reason}")
    return WatchRefused(f"watch {prefix}: {reason}")


def retry_backoff() -> Backoff:
    """A fresh backoff for the one retry policy; sleep with `cap=retry_cap(exc)`."""
    return Backoff(base=0.1, cap=RETRY_CAP)


def retry_cap(exc: BaseException) -> float:
    """The longest wait before retrying after `exc` (see RETRY_CAP)."""
    return AUTH_RETRY_CAP if isinstance(exc, AuthError) else RETRY_CAP


class Store(abc.ABC):
    """An etcd v3 client for fluster's needs: ranges, txns, leases and watches."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    async def connect(self) -> None:
        """Get ready (and authenticate when a user is set); I/O may wait for the first call."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- key-value ----------------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, key: str, *, revision: int = 0) -> tuple[int, KeyValue | None]:
        """(store revision, the key or None), now or as it was at `revision` (Compacted
        when etcd no longer keeps that revision)."""

    @abc.abstractmethod
    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[int, list[KeyValue]]:
        """(store revision, every key under `prefix`), one consistent read."""

    @abc.abstractmethod
    async def count_prefix(
        self,
        prefix: str,
        *,
        revision: int = 0,
        min_mod_revision: int = 0,
        min_create_revision: int = 0,
    ) -> int:
        """How many keys under `prefix` (at `revision`, changed or created at or after the
        minimums); no value crosses the wire. Compacted for an old revision."""

    @abc.abstractmethod
    async def put(self, key: str, value: str | bytes, *, lease: int = 0) -> int:
        """Write `key`; returns the new store revision."""

    @abc.abstractmethod
    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key (or every key under it); returns how many went."""

    @abc.abstractmethod
    async def replace(
        self,
        key: str,
        value: str | bytes | None,
        *,
        mod_revision: int,
        lease: int = 0,
    ) -> int:
        """Put (or, for None, delete) `key` only if its mod revision is still `mod_revision`.

        `mod_revision=0` means "only if the key does not exist". Raises Conflict when
        someone else wrote in between; returns the new store revision.
        """

    @abc.abstractmethod
    async def compact(self, revision: int) -> None: ...

    # -- leases -------------------------------------------------------------------------

    @abc.abstractmethod
    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""

    @abc.abstractmethod
    async def revoke(self, lease: int) -> None:
        """End `lease` and delete its keys; an expired one is fine."""

    @abc.abstractmethod
    def keepalive(self, lease: int, interval: float) -> AsyncIterator[int]:
        """Refresh `lease` every `interval` seconds; yields each new TTL.

        Raises LeaseLost when etcd says the lease is gone, Unavailable when the
        connection breaks or an answer is overdue (a frozen member never answers).
        """

    # -- watch --------------------------------------------------------------------------

    @abc.abstractmethod
    def watch(
        self, prefix: str, start_revision: int, *, progress_every: float = 5.0
    ) -> AsyncIterator[WatchBatch]:
        """Stream every change under `prefix` from `start_revision`, with previous values.

        Never resumes by itself: a broken stream raises Unavailable, history that was
        compacted away raises Compacted, and a refused watch raises WatchRefused, so the
        caller (fluster/follow.py) decides between resuming and a full resync.

        About every `progress_every` seconds without a change the stream yields a batch
        with no events: proof that it is alive and current (its revision is not a
        promise that every event up to it was delivered). Silence for longer than that
        plus the call timeout means the member is frozen, and raises Unavailable.
        """


Transport = Literal["grpc", "http"]


def transport_for(settings: EtcdSettings, preferred: Transport = "grpc") -> Transport:
    """The transport `settings` ask for; `auto` is `preferred`, except that a client
    certificate goes over gRPC: etcd's gateway does not take a certificate's identity
    (its CN) and, with `--client-cert-auth`, refuses a certificate that has a CN at all."""
    if settings.transport != "auto":
        return settings.transport
    if preferred == "http" and settings.cert is not None:
        return "grpc"
    return preferred


def open_store(settings: EtcdSettings, *, preferred: Transport = "grpc") -> Store:
    """A Store for `settings` (not connected yet); see `transport_for`."""
    if transport_for(settings, preferred) == "http":
        from fluster.store_http import HttpStore

        return HttpStore(settings)
    from fluster.store_grpc import GrpcStore

    return GrpcStore(settings)


__all__: Sequence[str] = (
    "AuthError",
    "Compacted",
    "Conflict",
    "EtcdSettings",
    "Event",
    "KeyValue",
    "LeaseLost",
    "Store",
    "StoreError",
    "Unavailable",
    "WatchBatch",
    "WatchRefused",
    "open_store",
)
