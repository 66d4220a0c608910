"""The Store over etcd's own gRPC protocol (the reloader's, the deployer's, the CLI's).

The client library (etcd3aio, for its generated etcd v3 stubs) is used here alone.
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
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

# etcd3aio keeps its generated stubs in a private module; importing it here (and only
# here) is the price of driving the streams ourselves.
from etcd3aio import _protobuf as pb

from fluster.channel import EtcdSettings, Unresolved, parse_endpoint, resolve
from fluster.store import (
    Compacted,
    Conflict,
    Event,
    KeyValue,
    LeaseLost,
    Store,
    StoreError,
    Unavailable,
    WatchBatch,
    error_for,
    prefix_end,
    watch_cancelled,
)

_PROGRESS = pb.rpc_pb2.WatchProgressRequest()  # type: ignore[attr-defined]
_DELETE = pb.kv_pb2.Event.DELETE  # type: ignore[attr-defined]

# Pings every 6 s, dead after 5 s more without an ack: a frozen member is noticed in ~11 s.
# etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time), hence not lower.
KEEPALIVE_TIME_MS = 6_000
KEEPALIVE_TIMEOUT_MS = 5_000


def _kv(raw: Any) -> KeyValue:
    return KeyValue(
        key=raw.key.decode("utf-8", "replace"),
        value=bytes(raw.value),
        mod_revision=raw.mod_revision,
        create_revision=raw.create_revision,
        lease=raw.lease,
    )


def map_error(exc: grpc.aio.AioRpcError, what: str) -> StoreError:
    """Turn a gRPC status into one of ours, keeping etcd's own words."""
    code = exc.code()
    return error_for(code.value[0], exc.details() or code.name, what)


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


class GrpcStore(Store):
    """The Store over gRPC: one channel to every member (`open_channel`)."""

    def __init__(self, settings: EtcdSettings) -> None:
        super().__init__(settings)
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
        request = pb.RangeRequest(key=key.encode(), revision=revision)
        reply = await self._call("get", "kv.Range", request)
        return reply.header.revision, (_kv(reply.kvs[0]) if reply.kvs else None)

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[int, list[KeyValue]]:
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
                    raise watch_cancelled(prefix, reply.cancel_reason)
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
