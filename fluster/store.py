"""The one module that talks to etcd.

Everything else in fluster sees `Store` and the few exceptions below, never gRPC: the
client library (etcd3aio, for its generated etcd v3 stubs) can be swapped here alone.
We drive the stubs ourselves rather than through etcd3aio's services because the parts
that matter for a discovery system are exactly the ones a generic client gets subtly
wrong for us: watches must carry `hasleader` and must surface compaction instead of
skipping past it, lease keepalives must use one long-lived stream, and every gRPC error
must become one of our exceptions at the call site.

One channel serves all members (fluster/channel.py, with the settings every component
shares): `round_robin` over the resolved endpoints, so a dead or frozen member (noticed
by HTTP/2 keepalive pings) drops out and calls go to a live one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import grpc.aio

# etcd3aio keeps its generated stubs in a private module; importing it here (and only
# here) is the price of driving the streams ourselves.
from etcd3aio import _protobuf as pb

from fluster.channel import (
    EtcdSettings,
    Unresolved,
    open_channel,
)
from fluster.runtime import Backoff

_PROGRESS = pb.rpc_pb2.WatchProgressRequest()  # type: ignore[attr-defined]
_DELETE = pb.kv_pb2.Event.DELETE  # type: ignore[attr-defined]

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


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=raw.key.decode("utf-8", "replace"),
        value=bytes(raw.value),
        mod_revision=raw.mod_revision,
        create_revision=raw.create_revision,
        lease=raw.lease,
    )


def prefix_end(prefix: bytes) -> bytes:
    """The exclusive range end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def map_error(exc: grpc.aio.AioRpcError, what: str) -> StoreError:
    """Turn a gRPC status into one of ours, keeping etcd's own words."""
    code, detail = exc.code(), exc.details() or ""
    message = f"{what}: {detail or code.name}"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" in detail:
        return AuthError(f"{what}: wrong user name or password")
    if code == grpc.StatusCode.NOT_FOUND and "lease" in detail:
        return LeaseLost(message)
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in detail:
        return Compacted(0)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
    ):
        return Unavailable(message)
    return StoreError(message)


def retry_backoff() -> Backoff:
    """A fresh backoff for the one retry policy; sleep with `cap=retry_cap(exc)`."""
    return Backoff(base=0.1, cap=RETRY_CAP)


def retry_cap(exc: BaseException) -> float:
    """The longest wait before retrying after `exc` (see RETRY_CAP)."""
    return AUTH_RETRY_CAP if isinstance(exc, AuthError) else RETRY_CAP


class Store:
    """An etcd v3 client for fluster's needs: ranges, txns, leases and watches."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Build the channel (no I/O happens until the first call) and authenticate."""
        if self._channel is None:
            try:
                self._channel = await open_channel(self.settings)
            except Unresolved as exc:
                raise Unavailable(str(exc)) from None
            except ValueError as exc:
                raise StoreError(str(exc)) from None
            self._kv = pb.KVStub(self._channel)
            self._lease = pb.LeaseStub(self._channel)
            self._watch = pb.WatchStub(self._channel)
            self._auth = pb.AuthStub(self._channel)
        if self.settings.user:
            await self._authenticate()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> Store:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("token", self._token),) if self._token else ()

    async def _authenticate(self) -> None:
        async with self._auth_lock:
            request = pb.AuthenticateRequest(
                name=self.settings.user, password=self.settings.password or ""
            )
            try:
                reply = await self._auth.Authenticate(request, timeout=self.settings.timeout)
            except grpc.aio.AioRpcError as exc:
                raise map_error(exc, "authenticate") from None
            self._token = reply.token

    async def _call(self, what: str, method: str, request: Any) -> Any:
        """One unary RPC (`method` is "stub.Method") with a deadline; an expired token is
        renewed and retried once."""
        if self._channel is None:
            await self.connect()
        stub, _, name = method.partition(".")
        call = getattr(getattr(self, f"_{stub}"), name)
        for attempt in (1, 2):
            try:
                return await call(request, metadata=self._metadata, timeout=self.settings.timeout)
            except grpc.aio.AioRpcError as exc:
                expired = exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.settings.user
                if expired and attempt == 1:
                    await self._authenticate()
                    continue
                raise map_error(exc, what) from None
        raise AssertionError("unreachable")

    # -- key-value ----------------------------------------------------------------------

    async def get(self, key: str, *, revision: int = 0) -> tuple[int, KeyValue | None]:
        """(store revision, the key or None), now or as it was at `revision` (Compacted
        when etcd no longer keeps that revision)."""
        request = pb.RangeRequest(key=key.encode(), revision=revision)
        reply = await self._call("get", "kv.Range", request)
        return reply.header.revision, (_kv(reply.kvs[0]) if reply.kvs else None)

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[int, list[KeyValue]]:
        """(store revision, every key under `prefix`), one consistent read."""
        raw = prefix.encode()
        request = pb.RangeRequest(key=raw, range_end=prefix_end(raw), revision=revision)
        reply = await self._call("get prefix", "kv.Range", request)
        return reply.header.revision, [_kv(kv) for kv in reply.kvs]

    async def count_prefix(
        self,
        prefix: str,
        *,
        revision: int = 0,
        min_mod_revision: int = 0,
        min_create_revision: int = 0,
    ) -> int:
        """How many keys under `prefix` (at `revision`, changed or created at or after the
        minimums); no value crosses the wire. Compacted for an old revision.

        etcd's `count` ignores the revision filters (they prune the returned keys only),
        so a filtered count reads the matching keys, without values, and counts them."""
        raw = prefix.encode()
        filtered = bool(min_mod_revision or min_create_revision)
        request = pb.RangeRequest(
            key=raw,
            range_end=prefix_end(raw),
            revision=revision,
            count_only=not filtered,
            keys_only=filtered,
            min_mod_revision=min_mod_revision,
            min_create_revision=min_create_revision,
        )
        reply = await self._call("count prefix", "kv.Range", request)
        return len(reply.kvs) if filtered else int(reply.count)

    async def put(self, key: str, value: str | bytes, *, lease: int = 0) -> int:
        data = value.encode() if isinstance(value, str) else value
        request = pb.PutRequest(key=key.encode(), value=data, lease=lease)
        reply = await self._call("put", "kv.Put", request)
        return int(reply.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key (or every key under it); returns how many went."""
        raw = key.encode()
        request = pb.DeleteRangeRequest(key=raw, range_end=prefix_end(raw) if prefix else b"")
        reply = await self._call("delete", "kv.DeleteRange", request)
        return int(reply.deleted)

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
        raw = key.encode()
        compare = pb.Compare(
            result=pb.Compare.EQUAL, target=pb.Compare.MOD, key=raw, mod_revision=mod_revision
        )
        if value is None:
            op = pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=raw))
        else:
            data = value.encode() if isinstance(value, str) else value
            op = pb.RequestOp(request_put=pb.PutRequest(key=raw, value=data, lease=lease))
        reply = await self._call(
            "transaction", "kv.Txn", pb.TxnRequest(compare=[compare], success=[op])
        )
        if not reply.succeeded:
            raise Conflict(
                f"{key} changed since it was read (expected mod revision {mod_revision})"
            )
        return int(reply.header.revision)

    async def compact(self, revision: int) -> None:
        request = pb.CompactionRequest(revision=revision, physical=True)
        await self._call("compact", "kv.Compact", request)

    async def grant(self, ttl: int) -> int:
        reply = await self._call("lease grant", "lease.LeaseGrant", pb.LeaseGrantRequest(TTL=ttl))
        if reply.error:
            raise StoreError(f"lease grant: {reply.error}")
        return int(reply.ID)

    async def revoke(self, lease: int) -> None:
        with contextlib.suppress(LeaseLost):
            await self._call("lease revoke", "lease.LeaseRevoke", pb.LeaseRevokeRequest(ID=lease))

    async def keepalive(self, lease: int, interval: float) -> AsyncIterator[int]:
        """Refresh `lease` every `interval` seconds over one stream; yields each new TTL.

        Raises LeaseLost when etcd says the lease is gone, Unavailable when the stream
        breaks or an answer is overdue (a frozen member never closes the stream itself).
        """
        if self._channel is None:
            await self.connect()

        async def requests() -> AsyncIterator[Any]:
            while True:
                yield pb.LeaseKeepAliveRequest(ID=lease)
                await asyncio.sleep(interval)

        call = self._lease.LeaseKeepAlive(requests(), metadata=self._metadata)
        try:
            while True:
                async with asyncio.timeout(interval + self.settings.timeout):
                    reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise Unavailable("lease keepalive: stream closed by the server")
                if reply.TTL <= 0:
                    raise LeaseLost(f"lease {lease:x} expired")
                yield int(reply.TTL)
        except TimeoutError:
            raise Unavailable("lease keepalive: no answer from etcd") from None
        except grpc.aio.AioRpcError as exc:
            raise map_error(exc, "lease keepalive") from None
        finally:
            call.cancel()

    # -- watch --------------------------------------------------------------------------

    async def watch(
        self, prefix: str, start_revision: int, *, progress_every: float = 5.0
    ) -> AsyncIterator[WatchBatch]:
        """Stream every change under `prefix` from `start_revision`, with previous values.

        Never resumes by itself: a broken stream raises Unavailable, history that was
        compacted away raises Compacted, and a refused watch raises WatchRefused, so the
        caller (the catalog) decides between resuming and a full resync.

        Every `progress_every` seconds we ask etcd for a progress notification, which
        arrives as a batch with no events: proof that the stream is alive and current
        up to its revision even when nothing changes. Silence for longer than that plus
        the call timeout means the member is frozen, and raises Unavailable.
        """
        if self._channel is None:
            await self.connect()
        raw = prefix.encode()
        create = pb.WatchCreateRequest(
            key=raw, range_end=prefix_end(raw), start_revision=start_revision, prev_kv=True
        )

        async def requests() -> AsyncIterator[Any]:
            yield pb.WatchRequest(create_request=create)
            while True:
                await asyncio.sleep(progress_every)
                yield pb.WatchRequest(progress_request=_PROGRESS)

        # `hasleader`: a member cut off from the quorum cancels this watch instead of
        # serving a stale stream forever.
        metadata = (*self._metadata, ("hasleader", "true"))
        call = self._watch.Watch(requests(), metadata=metadata)
        try:
            while True:
                async with asyncio.timeout(progress_every + self.settings.timeout):
                    reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise Unavailable(f"watch {prefix}: stream ended")
                if reply.compact_revision:
                    raise Compacted(int(reply.compact_revision))
                if reply.canceled or (reply.created and reply.watch_id == -1):
                    raise self._cancelled(prefix, reply.cancel_reason)
                if reply.created:
                    continue
                events = tuple(
                    Event(
                        type="delete" if ev.type == _DELETE else "put",
                        kv=_kv(ev.kv),
                        prev=_kv(ev.prev_kv) if ev.HasField("prev_kv") else None,
                    )
                    for ev in reply.events
                )
                yield WatchBatch(int(reply.header.revision), events)
        except TimeoutError:
            raise Unavailable(f"watch {prefix}: no word from etcd, member frozen?") from None
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and self.settings.user:
                with contextlib.suppress(StoreError):
                    await self._authenticate()  # the caller's resume will use the new token
                raise Unavailable(f"watch {prefix}: auth token expired, renewed") from None
            raise map_error(exc, f"watch {prefix}") from None
        finally:
            call.cancel()

    @staticmethod
    def _cancelled(prefix: str, reason: str) -> StoreError:
        reason = reason or "refused by the server"
        if "permission" in reason or "auth" in reason:
            return AuthError(f"watch {prefix}: {reason}")
        if "leader" in reason:
            return Unavailable(f"watch {prefix}: {reason}")
        return WatchRefused(f"watch {prefix}: {reason}")


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
)
