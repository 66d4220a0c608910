"""Automatic certificates: ACME HTTP-01 orders, one edge at a time, results into etcd.

With `RELOADER_ACME_DIRECTORY` set, every edge runs an `AcmeIssuer`. It looks for hosts
that need a certificate (`wanted_hosts`: hosts of HTTP services whose spec asks for
HTTPS, that no valid certificate covers, or whose own record, named as the host, has
used 2/3 of its lifetime) and, when there are some:

1. takes `{prefix}/acme/lock` under a lease (`fluster.lease`): N edges, one order; the
   others see the certificate arrive through their certificate watch like any other;
2. orders with the `acme` library (certbot's, not a hand-written protocol), putting each
   HTTP-01 key authorization under `{prefix}/acme/challenges/{token}`, so whichever edge
   the CA's request reaches answers it (HAProxy routes /.well-known/acme-challenge/ to
   the reloader, which reads the token from etcd);
3. writes the chain + a fresh key to `{prefix}/certs/{host}` after the same validation
   as `fluster cert add`; the edges load it through the runtime API, no reload.

A failure (CA unreachable, challenge refused) is retried per host with exponential
backoff (15-30 s, doubling, up to 1 h), counted and shown in /status and /metrics; the
certificate already in etcd, if any, keeps serving until it expires. The `acme` library is
synchronous (requests), so an order runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fluster import keys
from fluster.catalog import Snapshot
from fluster.certs import Certificate, covers
from fluster.lease import Lease
from fluster.records import RecordError
from fluster.runtime import Backoff
from fluster.store import Conflict, Store, StoreError
from reloader.state_dir import StateDir

log = structlog.get_logger("reloader.acme")

RENEW_AT = 2 / 3
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")
ORDER_TIMEOUT = 90.0
LOCK_TTL = 30
CHECK_EVERY = 60.0


class AcmeError(Exception):
    """An order failed: CA unreachable, a challenge refused, a bad certificate back."""


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    directory: str
    email: str = ""
    ca_file: Path | None = None  # trust for the directory's TLS (a private CA, pebble)
    renew_at: float = RENEW_AT  # fraction of the lifetime after which we renew


def wanted_hosts(
    snapshot: Snapshot, certs: Mapping[str, Certificate], now: datetime, renew_at: float
) -> list[str]:
    """Hosts to order a certificate for (pure): see the module docstring.

    Only DNS names given in a spec's `hosts` (the CA must reach them; IP literals and
    the `{service}.{domain}` default are not public names) of services whose `https` is
    `on` or `redirect` explicitly.
    """
    out: set[str] = set()
    for svc in snapshot.services.values():
        spec = svc.spec
        if spec.mode != "http" or spec.https not in ("on", "redirect"):
            continue
        for host in spec.hosts:
            if ":" in host or host.replace(".", "").isdigit():
                continue
            own = certs.get(host)
            if own is not None and own.not_after > now:
                if own.lifetime_used(now) >= renew_at:
                    out.add(host)
                continue
            if not any(c.not_after > now and covers(c.names, host) for c in certs.values()):
                out.add(host)
    return sorted(out)


@dataclass
class AcmeStats:
    orders: int = 0  # certificates obtained
    failures: int = 0  # orders that failed
    last_error: str = ""
    retry_at: dict[str, float] = field(default_factory=dict)  # host -> unix time


class AcmeIssuer:
    def __init__(
        self,
        settings: AcmeSettings,
        store: Store,
        prefix: str,
        state_dir: Path,
        holder: str,
        snapshot: Callable[[], Snapshot | None],
        certs: Callable[[], Mapping[str, Certificate]],
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.store, self.prefix = store, prefix
        self.account_file = StateDir(state_dir).acme_account
        self.holder = holder
        self.snapshot, self.certs, self.now = snapshot, certs, now
        self.stats = AcmeStats()
        self.wake = asyncio.Event()
        self._backoff: dict[str, Backoff] = {}
        self._client: Any = None

    # -- the HTTP-01 answer, served by the status server behind HAProxy ------------------

    async def answer(self, token: str) -> str | None:
        if TOKEN_RE.fullmatch(token) is None:
            return None
        try:
            _, kv = await self.store.get(keys.acme_challenge_key(self.prefix, token))
        except StoreError:
            return None
        return None if kv is None else kv.value.decode("ascii", "replace")

    # -- the loop ------------------------------------------------------------------------

    def due(self) -> list[str]:
        snap = self.snapshot()
        if snap is None:
            return []
        hosts = wanted_hosts(snap, self.certs(), self.now(), self.settings.renew_at)
        now = time.time()
        return [h for h in hosts if self.stats.retry_at.get(h, 0.0) <= now]

    async def run(self) -> None:
        while True:
            hosts = self.due()
            if hosts:
                await self._round(hosts)
            waits = [t - time.time() for t in self.stats.retry_at.values()]
            timeout = max(1.0, min([CHECK_EVERY, *waits]))
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def _round(self, hosts: list[str]) -> None:
        lease = Lease(self.store, LOCK_TTL, name="acme lock")
        try:
            async with lease:
                try:
                    await lease.put_if_absent(keys.acme_lock_key(self.prefix), self.holder)
                except Conflict:
                    log.info("another edge is ordering certificates", hosts=hosts)
                    return
                for host in hosts:
                    if not lease.holds(keys.acme_lock_key(self.prefix)):
                        return
                    if host not in self.due():  # another edge's certificate arrived meanwhile
                        continue
                    await self._issue(host, lease)
        except StoreError as exc:
            log.warning("acme: etcd error, retrying later", error=str(exc))

    async def _issue(self, host: str, lease: Lease) -> None:
        backoff = self._backoff.setdefault(host, Backoff(base=30.0, cap=3600.0))
        started = time.monotonic()
        try:
            pem = await self._order(host, lease)
            Certificate.parse(host, pem, now=self.now())
            await self.store.put(keys.cert_key(self.prefix, host), pem)
        except (AcmeError, RecordError, StoreError) as exc:
            delay = backoff.next_delay()
            self.stats.failures += 1
            self.stats.last_error = f"{host}: {exc}"[:500]
            self.stats.retry_at[host] = time.time() + delay
            log.error(
                "certificate order failed; the current certificate (if any) keeps serving",
                host=host,
                error=str(exc)[:500],
                attempt=backoff.attempt,
                retry_in=round(delay),
            )
            return
        backoff.reset()
        self.stats.retry_at.pop(host, None)
        self.stats.orders += 1
        log.info("certificate obtained", host=host, seconds=round(time.monotonic() - started, 2))

    # -- one order -----------------------------------------------------------------------

    async def _order(self, host: str, lease: Lease) -> str:
        """One order; challenge tokens live under the lock's lease, so an edge that dies
        mid-order leaves none behind."""
        loop = asyncio.get_running_loop()

        def put_token(token: str, validation: str) -> None:
            asyncio.run_coroutine_threadsafe(
                lease.put(keys.acme_challenge_key(self.prefix, token), validation), loop
            ).result(10)

        tokens: list[str] = []
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._order_sync, host, put_token, tokens), ORDER_TIMEOUT + 30
            )
        except TimeoutError:
            raise AcmeError(f"no certificate within {ORDER_TIMEOUT + 30:.0f} s") from None
        finally:
            for token in tokens:
                with contextlib.suppress(StoreError):
                    await self.store.delete(keys.acme_challenge_key(self.prefix, token))

    def _account_key(self) -> rsa.RSAPrivateKey:
        try:
            key = serialization.load_pem_private_key(self.account_file.read_bytes(), None)
            if isinstance(key, rsa.RSAPrivateKey):
                return key
        except (OSError, ValueError):
            pass
        key = rsa.generate_private_key(65537, 2048)
        self.account_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.account_file.chmod(0o600)
        return key

    def _connect(self) -> Any:
        """An ACME client with a registered account (made once, reused)."""
        if self._client is not None:
            return self._client
        from acme import client, errors, messages
        from josepy.jwk import JWKRSA

        key = JWKRSA(key=self._account_key())
        # requests takes a CA bundle path where ClientNetwork is typed for a bool.
        verify = cast(bool, str(self.settings.ca_file) if self.settings.ca_file else True)
        net = client.ClientNetwork(key, user_agent="fluster-reloader", verify_ssl=verify)
        directory = client.ClientV2.get_directory(self.settings.directory, net)
        acme = client.ClientV2(directory, net=net)
        email = self.settings.email or None
        try:
            acme.new_account(
                messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
            )
        except errors.ConflictError as exc:  # this key has an account already: use it
            net.account = messages.RegistrationResource(
                uri=exc.location, body=messages.Registration()
            )
        self._client = (acme, key)
        return self._client

    def _order_sync(
        self, host: str, put_token: Callable[[str, str], None], tokens: list[str]
    ) -> str:
        from acme import challenges, crypto_util, messages
        from acme import errors as acme_errors

        try:
            acme, account_key = self._connect()
            cert_key = ec.generate_private_key(ec.SECP256R1())
            key_pem = cert_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            order = acme.new_order(crypto_util.make_csr(key_pem, [host]))
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # the CA reuses a recent validation of this name
                chall = next(
                    (c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)),
                    None,
                )
                if chall is None:
                    raise AcmeError(f"{host}: the CA offers no HTTP-01 challenge")
                response, validation = chall.response_and_validation(account_key)
                token = chall.chall.encode("token")
                put_token(token, validation)
                tokens.append(token)
                acme.answer_challenge(chall, response)
            deadline = datetime.now() + timedelta(seconds=ORDER_TIMEOUT)
            done = acme.poll_and_finalize(order, deadline)
        except AcmeError:
            self._client = None
            raise
        except (acme_errors.Error, OSError, ValueError) as exc:
            self._client = None  # reconnect next time (directory moved, nonce state, ...)
            raise AcmeError(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:  # requests' and josepy's own error types, among others
            self._client = None
            raise AcmeError(f"{type(exc).__name__}: {exc}") from None
        chain: str = done.fullchain_pem
        return chain.rstrip("\n") + "\n" + key_pem.decode()
