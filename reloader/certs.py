"""HTTPS state at the edge: certificates from etcd, the per-host policy, and the
runtime API calls that change them inside a running HAProxy without a reload.

haproxy.cfg only names files under `{state_dir}/tls/` (see reloader/model.py); this
module owns their contents:

- `certs/{name}.pem`: one file per valid certificate record, listed in `crt-list`
  (HAProxy picks the certificate by SNI from the names in each file);
- `default.pem`: a self-signed certificate made once per edge, served for names no
  record covers, so the HTTPS bind never waits for a certificate;
- `https.map` (host -> off|on|redirect) and `hsts.map` (host -> max-age).

`target()` computes what they should hold (pure); `TlsFiles.write()` puts that on disk
first, so a reload or a restart of HAProxy at any moment reproduces it; `push()` then
makes the same change in HAProxy's memory: `new/set/commit ssl cert` + `add ssl
crt-list` for certificates, `add/set/del map` for the policy. A certificate that fails
validation never gets here (`CertWatcher` keeps the previous valid one for its name).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

import structlog

from fluster import keys
from fluster.catalog import Snapshot
from fluster.certs import Certificate, self_signed
from fluster.follow import Follow
from fluster.records import RecordError
from fluster.store import KeyValue, Store, Unavailable, WatchBatch
from reloader.haproxy import HaproxyError, cli
from reloader.model import RenderSettings

log = structlog.get_logger("reloader.certs")

DEFAULT_CERT_NAME = "fluster-default.invalid"
STRICTNESS = {"off": 0, "on": 1, "redirect": 2}


# -- what the files should hold (pure) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsTarget:
    certs: Mapping[str, str] = field(default_factory=dict)  # name -> PEM, sorted by name
    policy: Mapping[str, str] = field(default_factory=dict)  # Host header -> off|on|redirect
    hsts: Mapping[str, int] = field(default_factory=dict)  # Host header -> max-age


def host_key(host: str) -> str:
    """A host as the frontends look it up: the Host header, lower case, no port."""
    return f"[{host}]" if ":" in host else host


def target(certs: Mapping[str, Certificate], snapshot: Snapshot, domain: str) -> TlsTarget:
    """What HAProxy should hold for `certs` and the services of `snapshot`.

    The policy is per host, because TLS and the HTTP->HTTPS redirect happen before a
    path is looked at: when services share a host on different paths, the strictest
    policy of theirs applies to it (redirect > on > off), and the longest HSTS.
    """
    policy: dict[str, str] = {}
    hsts: dict[str, int] = {}
    for name, svc in snapshot.services.items():
        spec = svc.spec
        if spec.mode != "http":
            continue
        hosts = spec.hosts or (f"{name}.{domain}",)
        covered = any(cert.covers(h) for cert in certs.values() for h in hosts)
        mine = spec.https or ("redirect" if covered else "off")
        for host in map(host_key, hosts):
            if STRICTNESS[mine] >= STRICTNESS[policy.get(host, "off")]:
                policy[host] = mine
            if spec.hsts_seconds and mine != "off":
                hsts[host] = max(hsts.get(host, 0), spec.hsts_seconds)
    return TlsTarget(
        certs=MappingProxyType({n: certs[n].pem for n in sorted(certs)}),
        policy=MappingProxyType(dict(sorted(policy.items()))),
        hsts=MappingProxyType(dict(sorted(hsts.items()))),
    )


# -- files + runtime API -----------------------------------------------------------------


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class TlsFiles:
    """The files under `{state_dir}/tls/`, and HAProxy's copy of them."""

    def __init__(self, settings: RenderSettings, admin_socket: Path) -> None:
        self.settings = settings
        self.admin_socket = admin_socket
        self.certs_dir = settings.files.tls_certs
        self.written = TlsTarget()  # what the files hold
        self.commands = 0  # runtime API commands sent, for tests and metrics
        self._synced = False  # files from a previous run are rewritten at the first write

    def cert_file(self, name: str) -> Path:
        return self.certs_dir / f"{name}.pem"

    def ensure_default(self, now: datetime | None = None) -> None:
        """Make the default certificate once; a broken or expired one is made again."""
        self.certs_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.settings.tls_dir, 0o700)
        path = self.settings.default_cert
        try:
            Certificate.parse("default", path.read_text(encoding="ascii"), now=now)
            return
        except (OSError, UnicodeDecodeError, RecordError):
            pass
        cert, key = self_signed([DEFAULT_CERT_NAME], days=3650, now=now)
        _write(path, cert + key, 0o600)
        log.info("made the default certificate", path=str(path))

    def write(self, want: TlsTarget) -> None:
        """Put `want` on disk; files of certificates no longer wanted go."""
        if self._synced and want is self.written:
            return  # the target kept for a membership change (see reloader/tls.py: EdgeTls.write)
        self.certs_dir.mkdir(parents=True, exist_ok=True)
        for name, pem in want.certs.items():
            if self.written.certs.get(name) != pem or not self.cert_file(name).exists():
                _write(self.cert_file(name), pem, 0o600)
        have, first = self.written, not self._synced
        # Only what changed is rewritten (each write is an fsync): a rotation is one file.
        if first or want.certs.keys() != have.certs.keys():
            lines = "".join(f"{self.cert_file(n)}\n" for n in want.certs)
            _write(self.settings.crt_list, lines)
        if first or want.policy != have.policy:
            policy = "".join(f"{h} {p}\n" for h, p in want.policy.items())
            _write(self.settings.https_map, policy)
        if first or want.hsts != have.hsts:
            _write(self.settings.hsts_map, "".join(f"{h} {s}\n" for h, s in want.hsts.items()))
        for stale in self.certs_dir.glob("*.pem"):
            if stale.name[: -len(".pem")] not in want.certs:
                stale.unlink(missing_ok=True)
        self.written = want
        self._synced = True

    async def _run(self, command: str, *ok: str) -> None:
        reply = (await cli(self.admin_socket, command)).strip()
        self.commands += 1
        if not any(o in reply for o in ok):
            raise HaproxyError(f"{command.split(' <<')[0]!r} -> {reply[:300]!r}")

    async def push(self, have: TlsTarget, want: TlsTarget) -> int:
        """Change HAProxy's memory from `have` to `want`; returns the changes made.

        Additions before removals, like servers: a renamed record never leaves its
        names without a certificate in between.
        """
        changes = 0
        crt_list = self.settings.crt_list
        for name, pem in want.certs.items():
            old = have.certs.get(name)
            if old == pem:
                continue
            path = self.cert_file(name)
            if old is None:
                await self._run(f"new ssl cert {path}", "New empty certificate store")
            await self._run(f"set ssl cert {path} <<\n{pem}", "Transaction")
            await self._run(f"commit ssl cert {path}", "Success!")
            if old is None:
                await self._run(f"add ssl crt-list {crt_list} {path}", "Success!")
            changes += 1
            log.info("certificate loaded", cert=name, new=old is None)
        for name in have.certs.keys() - want.certs.keys():
            path = self.cert_file(name)
            await self._run(f"del ssl crt-list {crt_list} {path}", "deleted")
            await self._run(f"del ssl cert {path}", "deleted")
            changes += 1
            log.info("certificate removed", cert=name)
        changes += await self._push_map(self.settings.https_map, have.policy, want.policy)
        changes += await self._push_map(self.settings.hsts_map, have.hsts, want.hsts)
        return changes

    async def _push_map(
        self, path: Path, have: Mapping[str, object], want: Mapping[str, object]
    ) -> int:
        changes = 0
        for key, value in want.items():
            if key not in have:
                await self._run(f"add map {path} {key} {value}", "")
            elif have[key] != value:
                await self._run(f"set map {path} {key} {value}", "")
            else:
                continue
            changes += 1
        for key in have.keys() - want.keys():
            await self._run(f"del map {path} {key}", "")
            changes += 1
        return changes


# -- following {prefix}/certs/ -----------------------------------------------------------


class CertWatcher:
    """The valid certificates under `{prefix}/certs/`.

    An invalid value is skipped with a reason (like any record) and the last valid
    certificate of that name keeps serving: a botched rotation must not take a site's
    TLS down. Deleting the key removes the certificate.
    """

    def __init__(
        self,
        store: Store,
        prefix: str,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.prefix = keys.certs_prefix(prefix)
        self.now = now
        self.certs: dict[str, Certificate] = {}
        self.rejected: dict[str, str] = {}
        self.rejected_total = 0
        self.loaded = False
        self.on_change: Callable[[], None] = lambda: None
        self.follow = Follow(store, self.prefix, retried=(Unavailable,))

    def _name(self, key: str) -> str:
        return key[len(self.prefix) :]

    def _put(self, kv: KeyValue, revision: int) -> None:
        name = self._name(kv.key)
        try:
            cert = Certificate.parse(name, kv.value, now=self.now())
        except RecordError as exc:
            self.rejected_total += 1
            self.rejected[name] = str(exc)
            log.warning(
                "invalid certificate skipped",
                key=kv.key[:300],
                reason=str(exc)[:300],
                revision=revision,
                still_serving=self.certs[name].fingerprint[:16] if name in self.certs else None,
            )
            return
        self.rejected.pop(name, None)
        self.certs[name] = cert

    def on_list(self, revision: int, kvs: Sequence[KeyValue]) -> None:
        previous = dict(self.certs)
        self.certs.clear()
        self.rejected.clear()
        for kv in kvs:
            name = self._name(kv.key)
            self._put(kv, revision)
            if name not in self.certs and name in previous:
                self.certs[name] = previous[name]  # still the last valid one we saw
        self.loaded = True
        self.on_change()

    def on_events(self, batch: WatchBatch) -> None:
        for event in batch.events:
            if event.type == "put":
                self._put(event.kv, batch.revision)
            else:
                name = self._name(event.kv.key)
                self.certs.pop(name, None)
                self.rejected.pop(name, None)
        self.on_change()

    def valid(self) -> dict[str, Certificate]:
        """The certificates to serve now: an expired one stops being served."""
        now = self.now()
        return {n: c for n, c in sorted(self.certs.items()) if c.not_after > now}

    async def run(self) -> None:
        """List, then watch, until cancelled: `fluster.follow` resumes after a break and
        lists again after a compaction. Like the catalog, only Unavailable is retried: a
        reloader that may not read certs/ stops loudly (see docs/OPERATIONS.md, RBAC)."""
        await self.follow.run(self.on_list, self.on_events)
