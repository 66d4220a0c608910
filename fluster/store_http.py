"""The Store over etcd's JSON gateway (`/v3/...` on the client port): the sidekick's.

Same answers and exceptions as the gRPC store, in JSON: keys and values travel in
base64, 64-bit numbers as strings, fields at their zero value are left out. Where gRPC
has a long-lived stream the gateway has requests:

- a lease keepalive is one `POST /v3/lease/keepalive` per refresh on a kept-alive
  connection (the gateway opens and closes etcd's stream for it);
- a watch is one `POST /v3/watch` whose response streams the events. Its request body
  is sent whole, so there is no progress request: when `progress_every` passes without
  a word, the watch is opened again from the revision after the last event it brought.
  etcd answering that proves it alive and current, which is what a progress
  notification says, and it is yielded as one (a batch with no events). A member that
  does not answer within the timeout raises Unavailable.

Endpoints are tried in turn: a refused connection moves to the next one at once, any
other failure moves on for the next call (the caller retries, fluster/follow.py and
fluster/lease.py). Identity is a user's token (`Authorization`); etcd's gateway does
not pass a client certificate's CN on, which `fluster.store.transport_for` accounts for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fluster.channel import EtcdSettings, parse_endpoint
from fluster.http1 import Address, Client
from fluster.store import (
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    UNKNOWN,
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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _kv(raw: Mapping[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(raw.get("key", "")).decode("utf-8", "replace"),
        value=base64.b64decode(raw.get("value", "")),
        mod_revision=int(raw.get("mod_revision", 0)),
        create_revision=int(raw.get("create_revision", 0)),
        lease=int(raw.get("lease", 0)),
    )


def _revision(reply: Mapping[str, Any]) -> int:
    return int((reply.get("header") or {}).get("revision", 0))


def _tls(s: EtcdSettings) -> ssl.SSLContext | None:
    if not s.tls:
        return None
    try:
        context = ssl.create_default_context(cafile=str(s.cacert) if s.cacert else None)
        if s.cert and s.key:
            context.load_cert_chain(str(s.cert), str(s.key))
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"etcd TLS files: {exc}") from None
    return context


class HttpStore(Store):
    """The Store over HTTP/1.1 to etcd's JSON gateway; see the module docstring."""

    def __init__(self, settings: EtcdSettings) -> None:
        super().__init__(settings)
        self._clients: list[Client] = []
        self._next = 0  # the endpoint the next call goes to
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        if not self._clients:
            tls = _tls(self.settings)
            for endpoint in self.settings.endpoints:
                try:
                    host, port = parse_endpoint(endpoint)
                except ValueError as exc:
                    raise StoreError(str(exc)) from None
                address = Address(
                    host, port, tls=tls, server_hostname=self.settings.tls_server_name
                )
                self._clients.append(
                    Client(address, host=f"{host}:{port}", timeout=self.settings.timeout)
                )
        if self.settings.user and self._token is None:
            try:
                await self._authenticate()
            except BaseException:
                await self.close()  # `async with` never reaches its exit
                raise

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients = []

    def _headers(self, **extra: str) -> dict[str, str]:
        return {**({"Authorization": self._token} if self._token else {}), **extra}

    async def _authenticate(self) -> None:
        async with self._auth_lock:
            body = {"name": self.settings.user, "password": self.settings.password or ""}
            reply = await self._post("authenticate", "/v3/auth/authenticate", body, auth=False)
            self._token = str(reply.get("token", ""))

    async def _post(
        self, what: str, path: str, body: Mapping[str, Any], *, auth: bool = True
    ) -> dict[str, Any]:
        """One request to the gateway; an expired token is renewed and the call retried
        once. Raises only StoreError and its kinds."""
        if not self._clients:
            await self.connect()
        data = json.dumps(body).encode()
        for attempt in (1, 2):
            status, raw = await self._send(what, path, data, auth)
            if status == 200:
                return _json(raw)
            code, detail = _error(raw, status)
            if code == UNAUTHENTICATED and auth and self.settings.user and attempt == 1:
                await self._authenticate()
                continue
            if code == UNAVAILABLE:
                self._next += 1  # "no leader", say: the caller's retry goes to another member
            raise error_for(code, detail, what)
        raise AssertionError("unreachable")

    async def _send(self, what: str, path: str, data: bytes, auth: bool) -> tuple[int, bytes]:
        failure: BaseException | None = None
        for _ in self._clients:
            client = self._clients[self._next % len(self._clients)]
            try:
                response = await client.request(
                    "POST", path, data, self._headers() if auth else None
                )
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                failure = exc
                self._next += 1  # nothing was sent: the next member, now
                continue
            except (OSError, TimeoutError) as exc:
                self._next += 1  # perhaps sent: the caller decides whether to retry
                raise Unavailable(f"{what}: etcd at {client.address}: {_words(exc)}") from None
            return response.status, response.body
        raise Unavailable(f"{what}: no etcd endpoint reachable ({_words(failure)})")

    # -- key-value ----------------------------------------------------------------------

    async def get(self, key: str, *, revision: int = 0) -> tuple[int, KeyValue | None]:
        reply = await self._post(
            "get", "/v3/kv/range", {"key": _b64(key.encode()), "revision": revision}
        )
        kvs = reply.get("kvs") or []
        return _revision(reply), (_kv(kvs[0]) if kvs else None)

    async def get_prefix(self, prefix: str, *, revision: int = 0) -> tuple[int, list[KeyValue]]:
        raw = prefix.encode()
        body = {"key": _b64(raw), "range_end": _b64(prefix_end(raw)), "revision": revision}
        reply = await self._post("get prefix", "/v3/kv/range", body)
        return _revision(reply), [_kv(kv) for kv in reply.get("kvs") or []]

    async def count_prefix(
        self,
        prefix: str,
        *,
        revision: int = 0,
        min_mod_revision: int = 0,
        min_create_revision: int = 0,
    ) -> int:
        # etcd's count ignores the revision filters: see GrpcStore.count_prefix.
        raw = prefix.encode()
        filtered = bool(min_mod_revision or min_create_revision)
        body = {
            "key": _b64(raw),
            "range_end": _b64(prefix_end(raw)),
            "revision": revision,
            "count_only": not filtered,
            "keys_only": filtered,
            "min_mod_revision": min_mod_revision,
            "min_create_revision": min_create_revision,
        }
        reply = await self._post("count prefix", "/v3/kv/range", body)
        return len(reply.get("kvs") or []) if filtered else int(reply.get("count", 0))

    async def put(self, key: str, value: str | bytes, *, lease: int = 0) -> int:
        data = value.encode() if isinstance(value, str) else value
        body = {"key": _b64(key.encode()), "value": _b64(data), "lease": lease}
        return _revision(await self._post("put", "/v3/kv/put", body))

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        raw = key.encode()
        body = {"key": _b64(raw), **({"range_end": _b64(prefix_end(raw))} if prefix else {})}
        return int((await self._post("delete", "/v3/kv/deleterange", body)).get("deleted", 0))

    async def replace(
        self,
        key: str,
        value: str | bytes | None,
        *,
        mod_revision: int,
        lease: int = 0,
    ) -> int:
        raw = _b64(key.encode())
        compare = {"result": "EQUAL", "target": "MOD", "key": raw, "mod_revision": mod_revision}
        if value is None:
            op: dict[str, Any] = {"request_delete_range": {"key": raw}}
        else:
            data = value.encode() if isinstance(value, str) else value
            op = {"request_put": {"key": raw, "value": _b64(data), "lease": lease}}
        reply = await self._post(
            "transaction", "/v3/kv/txn", {"compare": [compare], "success": [op]}
        )
        if not reply.get("succeeded"):
            raise Conflict(
                f"{key} changed since it was read (expected mod revision {mod_revision})"
            )
        return _revision(reply)

    async def compact(self, revision: int) -> None:
        await self._post("compact", "/v3/kv/compaction", {"revision": revision, "physical": True})

    # -- leases -------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        reply = await self._post("lease grant", "/v3/lease/grant", {"TTL": ttl})
        if reply.get("error"):
            raise StoreError(f"lease grant: {reply['error']}")
        return int(reply.get("ID", 0))

    async def revoke(self, lease: int) -> None:
        with contextlib.suppress(LeaseLost):
            await self._post("lease revoke", "/v3/lease/revoke", {"ID": lease})

    async def keepalive(self, lease: int, interval: float) -> AsyncIterator[int]:
        while True:
            reply = await self._post("lease keepalive", "/v3/lease/keepalive", {"ID": lease})
            result = reply.get("result")
            if not isinstance(result, dict):
                code, detail = _error(json.dumps(reply).encode(), 200)
                raise error_for(code, detail, "lease keepalive")
            ttl = int(result.get("TTL", 0))
            if ttl <= 0:
                raise LeaseLost(f"lease {lease:x} expired")
            yield ttl
            await asyncio.sleep(interval)

    # -- watch --------------------------------------------------------------------------

    async def watch(
        self, prefix: str, start_revision: int, *, progress_every: float = 5.0
    ) -> AsyncIterator[WatchBatch]:
        if not self._clients:
            await self.connect()
        raw = prefix.encode()
        start, opened = start_revision, False
        while True:
            body = {
                "create_request": {
                    "key": _b64(raw),
                    "range_end": _b64(prefix_end(raw)),
                    "start_revision": start,
                    "prev_kv": True,
                }
            }
            client = self._clients[self._next % len(self._clients)]
            # `hasleader`: a member cut off from the quorum cancels the watch instead of
            # serving a stale stream forever (gRPC metadata, through the gateway).
            headers = self._headers(**{"Grpc-Metadata-Hasleader": "true"})
            try:
                async with client.stream(
                    "POST", "/v3/watch", json.dumps(body).encode(), headers
                ) as stream:
                    if stream.status != 200:
                        code, detail = _error(await stream.read(), stream.status)
                        if code == UNAUTHENTICATED and self.settings.user:
                            await self._authenticate()  # the caller's resume uses it
                            raise Unavailable(f"watch {prefix}: auth token expired, renewed")
                        raise error_for(code, detail, f"watch {prefix}")
                    lines = stream.lines()
                    while True:
                        try:
                            async with asyncio.timeout(progress_every):
                                line = await anext(lines)
                        except TimeoutError:
                            break  # quiet: open it again, as a progress request
                        except StopAsyncIteration:
                            raise Unavailable(f"watch {prefix}: stream ended") from None
                        result = _json(line).get("result")
                        if not isinstance(result, dict):
                            code, detail = _error(line, 200)
                            raise error_for(code, detail, f"watch {prefix}")
                        if int(result.get("compact_revision", 0)):
                            raise Compacted(int(result["compact_revision"]))
                        if result.get("canceled") or (
                            result.get("created") and int(result.get("watch_id", 0)) == -1
                        ):
                            raise watch_cancelled(prefix, str(result.get("cancel_reason", "")))
                        if result.get("created"):
                            if opened:
                                yield WatchBatch(_revision(result), ())
                            opened = True
                            continue
                        events = tuple(_event(ev) for ev in result.get("events") or ())
                        if events:
                            start = max(ev.kv.mod_revision for ev in events) + 1
                        yield WatchBatch(_revision(result), events)
            except (OSError, TimeoutError) as exc:
                self._next += 1
                raise Unavailable(
                    f"watch {prefix}: etcd at {client.address}: {_words(exc)}"
                ) from None


def _event(raw: Mapping[str, Any]) -> Event:
    prev = raw.get("prev_kv")
    return Event(
        type="delete" if raw.get("type") == "DELETE" else "put",
        kv=_kv(raw.get("kv") or {}),
        prev=_kv(prev) if prev else None,
    )


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        raise Unavailable(f"etcd answered something that is not JSON: {data[:80]!r}") from None
    return value if isinstance(value, dict) else {}


def _error(raw: bytes, status: int) -> tuple[int, str]:
    """(gRPC code, etcd's words) of a gateway error: `{"error": "...", "code": N}` for a
    request, `{"error": {"grpc_code": N, "message": "..."}}` inside a stream, or plain
    text from etcd's HTTP layer in front of the gateway."""
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        text = raw.decode("utf-8", "replace").strip()[:300] or f"HTTP {status}"
        if "CommonName" in text:
            # etcd (--client-cert-auth) refuses a certificate with a CN on its gateway.
            return PERMISSION_DENIED, (
                f"{text} (use a client certificate without a CommonName with "
                "--etcd-transport http, or --etcd-transport grpc)"
            )
        return (UNAVAILABLE if status >= 500 else UNKNOWN), text
    error = reply.get("error")
    if isinstance(error, dict):
        return int(error.get("grpc_code", UNKNOWN)), str(error.get("message", ""))
    code = reply.get("code")
    if code is None:
        return (UNAVAILABLE if status >= 500 else UNKNOWN), f"HTTP {status}"
    return int(code), str(reply.get("message") or error or f"HTTP {status}")


def _words(exc: BaseException | None) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
