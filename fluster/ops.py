"""Operator actions on the registry: promote, canary, rollback, drain, gc, spec edits.

Each action reads what it changes, decides, and writes back with a transaction that
compares the mod revision it read (`Store.replace`), so two operators acting at once
cannot silently overwrite each other: one wins, the other gets `Conflict`. The CLI in
`fluster.cli` only parses arguments and prints; everything that decides is here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fluster import keys
from fluster.catalog import Catalog, Service, Snapshot
from fluster.certs import Certificate, validate_cert_name
from fluster.records import Instance, RecordError, ServiceSpec
from fluster.routing import claims, owner_of, routing
from fluster.store import (
    Compacted,
    KeyValue,
    Store,
    StoreError,
)


class Refused(Exception):
    """The action is not safe or not possible in the registry's current state."""


class WaitTimeout(Exception):
    """Reloaders did not all apply the change in time."""


@dataclass(frozen=True, slots=True)
class InvalidSpec:
    """A spec key that holds an invalid record, and what a write over it starts from."""

    reason: str  # what the catalog found wrong with it
    last_valid: int = 0  # mod revision of the valid spec started from; 0: the defaults

    @property
    def start(self) -> str:
        if self.last_valid:
            return f"the last valid spec (revision {self.last_valid})"
        return "the defaults"


@dataclass(frozen=True, slots=True)
class Written:
    """The outcome of a spec write: what it is now, and the etcd revision that holds it;
    `replaced` says what was wrong with the invalid spec it overwrote, if it did."""

    spec: ServiceSpec
    revision: int
    replaced: InvalidSpec | None = None


# How many earlier values of an invalid spec key are read looking for a valid one.
SPEC_LOOKBACK = 20
# How long a write waits for every reloader to apply it (`fluster` and `fluster deploy`).
WAIT_TIMEOUT_S = 30.0
# How long a retired version's records (and, for an app, its stopped containers) stay
# ready for a rollback: the one declaration of the default, and its bound.
KEEP_OLD_TEXT = "10m"
MAX_KEEP_OLD_DAYS = 3650


async def snapshot(store: Store, prefix: str) -> Snapshot:
    return await Catalog(store, prefix).load()


def _service(svc: Service | None, name: str) -> Service:
    if svc is None:
        raise Refused(f"no service {name!r} in the registry (see `fluster ls`)")
    return svc


def up_count(svc: Service, version: str) -> int:
    return sum(1 for i in svc.instances.values() if i.version == version and i.state == "up")


async def write_spec(
    store: Store,
    prefix: str,
    svc: Service,
    spec: ServiceSpec,
    *,
    replaced: InvalidSpec | None = None,
) -> Written:
    """Compare-and-swap the spec against the revision `svc` was read at."""
    revision = await store.replace(
        keys.spec_key(prefix, svc.name), spec.to_json(), mod_revision=svc.spec_revision
    )
    return Written(spec, revision, replaced)


async def read_for_write(
    store: Store, prefix: str, service: str
) -> tuple[Snapshot, Service | None, InvalidSpec | None]:
    """The registry, the service as a spec write starts from, and, when its spec key holds
    an invalid record, what was wrong with it and what the write starts from instead.

    The catalog drops an invalid spec (a fresh one has no last good spec to keep), so
    the service would look spec-less, at mod revision 0, and every compare-and-swap
    would lose to the invalid record for ever. Here the service carries the invalid
    key's own mod revision, read at the snapshot's revision (a write since then still
    conflicts), and the last valid spec etcd keeps in that key's history, else the
    defaults: a promotion is not undone just because someone wrote garbage over it."""
    snap = await snapshot(store, prefix)
    key = keys.spec_key(prefix, service)
    why = snap.rejected.get(key)
    svc = snap.services.get(service)
    if why is None:
        return snap, svc, None
    _, kv = await store.get(key, revision=snap.revision)
    if kv is None:  # the snapshot saw the key at this very revision
        raise StoreError(f"{key} vanished from etcd's history at revision {snap.revision}")
    good, at = await _last_valid_spec(store, kv)
    svc = dataclasses.replace(
        svc or Service(name=service),
        spec=good or ServiceSpec(),
        has_spec=good is not None,
        spec_revision=kv.mod_revision,
        spec_created=kv.create_revision,
    )
    return snap, svc, InvalidSpec(why[:200], at)


async def _last_valid_spec(store: Store, kv: KeyValue) -> tuple[ServiceSpec | None, int]:
    """The newest valid value `kv`'s key held before it, and its mod revision; only since
    the key was last created (a deleted spec means the defaults) and within what etcd
    has not compacted."""
    for _ in range(SPEC_LOOKBACK):
        try:
            _, before = await store.get(kv.key, revision=kv.mod_revision - 1)
        except Compacted:
            break
        if before is None:
            break
        try:
            return ServiceSpec.parse(before.value), before.mod_revision
        except RecordError:
            kv = before
    return None, 0


async def edit_spec(
    store: Store, prefix: str, service: str, changes: dict[str, Any], *, domain: str = "localhost"
) -> Written:
    """Validated edit of routing fields; creates the spec when the service has none.

    Refuses a host (+ path) or a TCP port that another service already has, naming it:
    the edge would leave one of the two out (`fluster.routing`), so the write is wrong."""
    snap, found, replaced = await read_for_write(store, prefix, service)
    svc = found or Service(name=service)
    spec = svc.spec.replace(**changes)  # raises RecordError naming the field
    others = [s for name, s in snap.services.items() if name != service]
    candidate = dataclasses.replace(svc, spec=spec)
    for claim in claims(candidate, domain):
        owner = owner_of(others, claim, domain)
        if owner:
            host, path = claim
            where = host if path == "/" else f"{host}{path}"
            raise Refused(f"host {where} belongs to service {owner}; choose another host")
    if spec.mode == "tcp" and spec.port is not None:
        owner = next(
            (s.name for s in others if s.spec.mode == "tcp" and s.spec.port == spec.port), None
        )
        if owner:
            raise Refused(f"TCP port {spec.port} belongs to service {owner}; choose another")
    return await write_spec(store, prefix, svc, spec, replaced=replaced)


async def promote(
    store: Store,
    prefix: str,
    service: str,
    version: str,
    *,
    min_instances: int = 1,
    keep_old: timedelta | None = None,  # None: keep_old(KEEP_OLD_TEXT)
    force: bool = False,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Written:
    """Make `version` the active one. Refused below `min_instances` up, and (unless
    forced) when no instance of it is up: the spec would then route to nothing."""
    _, found, replaced = await read_for_write(store, prefix, service)
    svc = _service(found, service)
    have = up_count(svc, version)
    if have < min_instances:
        raise Refused(
            f"{service} has {have} instance(s) of {version} up, fewer than --min-instances "
            f"{min_instances}; versions registered: {_versions(svc)}"
        )
    if not have and not force:
        raise Refused(
            f"{service} has no instance of {version} up: the service would route to "
            f"nothing (--force to promote anyway); versions registered: {_versions(svc)}"
        )
    keep = parse_keep_old(KEEP_OLD_TEXT) if keep_old is None else keep_old
    old = svc.spec.active_version
    history = svc.spec.history if old in (None, version) else (old, *svc.spec.history)
    spec = svc.spec.replace(
        active_version=version,
        canary=None,
        history=list(history),
        keep_old_until=(now() + keep).isoformat(timespec="seconds"),
    )
    return await write_spec(store, prefix, svc, spec, replaced=replaced)


async def canary(
    store: Store, prefix: str, service: str, version: str, weight: int, *, analysis: bool = False
) -> Written:
    _, found, replaced = await read_for_write(store, prefix, service)
    svc = _service(found, service)
    if weight and not up_count(svc, version):
        raise Refused(f"{service} has no instance of {version} up to send a canary share to")
    if weight and version == svc.spec.active_version:
        raise Refused(f"{version} is already the active version of {service}")
    if weight and svc.spec.active_version is None:
        raise Refused(
            f"{service} routes every version (no active version): promote one first, "
            "then send a canary share to another"
        )
    share = {"version": version, "weight": weight, "analysis": analysis}
    spec = svc.spec.replace(canary=share if weight else None)
    return await write_spec(store, prefix, svc, spec, replaced=replaced)


async def rollback(store: Store, prefix: str, service: str) -> Written:
    """Back to the previous active version; from the first promotion, back to "(all)".

    A promotion from "(all)" records no history entry, so an empty history with an
    active version means "(all)" came before it (unless more than MAX_HISTORY
    promotions pushed older entries out)."""
    _, found, replaced = await read_for_write(store, prefix, service)
    svc = _service(found, service)
    if not svc.spec.history:
        if svc.spec.active_version is None:
            raise Refused(f"{service} routes every version already: nothing to roll back")
        if not any(i.state == "up" for i in svc.instances.values()):
            raise Refused(f"{service}: no instance is up to route every version to")
        spec = svc.spec.replace(active_version=None, canary=None, history=[])
        return await write_spec(store, prefix, svc, spec, replaced=replaced)
    previous, *rest = svc.spec.history
    if not up_count(svc, previous):
        raise Refused(
            f"{service}: no instance of the previous version {previous} is registered any more; "
            f"start some, then roll back (registered: {_versions(svc)})"
        )
    spec = svc.spec.replace(active_version=previous, canary=None, history=rest)
    return await write_spec(store, prefix, svc, spec, replaced=replaced)


async def drain(store: Store, prefix: str, service: str, instance: str) -> int:
    """Mark one instance draining, keeping its lease so it still expires with its owner."""
    key = keys.instance_key(prefix, service, instance)
    _, kv = await store.get(key)
    if kv is None:
        raise Refused(f"no instance {instance!r} of {service!r}")
    try:
        current = Instance.parse(kv.value)
    except RecordError as exc:
        raise Refused(f"{key} holds an invalid record ({exc}); delete it instead") from None
    draining = current.replace(state="draining")
    return await store.replace(
        key, draining.to_json(), mod_revision=kv.mod_revision, lease=kv.lease
    )


async def gc(
    store: Store,
    prefix: str,
    service: str,
    *,
    force: bool = False,
    dry_run: bool = False,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[str]:
    """Delete records of versions the spec no longer routes; returns their keys.

    Waits for `keep_old_until` (set by promote) unless forced, so a rollback stays
    possible for that long. Refuses (unless forced) to remove what the service falls
    back to while its active version has no instance up (`fluster.routing`): that
    would leave it routing to nothing. Each delete compares the record's mod revision:
    an instance that re-registered in the meantime is left alone.
    """
    snap = await snapshot(store, prefix)
    svc = _service(snap.services.get(service), service)
    invalid = snap.rejected.get(keys.spec_key(prefix, service))
    if invalid:
        # Reloaders may route by the last good spec or by the defaults (one started since
        # the bad write has nothing to keep): what is old cannot be told.
        raise Refused(
            f"{service}: its spec in etcd is invalid ({invalid[:200]}); write a valid one "
            "first (`fluster spec`, `promote` or `rollback` replace it)"
        )
    if svc.spec.active_version is None:
        return []  # every version is routed: nothing is old
    until = svc.spec.keep_old_until
    if until and not force and now() < datetime.fromisoformat(until):
        raise Refused(f"{service}: old versions are kept until {until} (--force to remove now)")
    now_routed = routing(svc)
    if not force and now_routed.fallback and not routing(_without_old(svc)).instances:
        raise Refused(
            f"{service}: {svc.spec.active_version} has no instance up and the service is "
            f"served by {now_routed.fallback}; removing old versions would route it to "
            "nothing (start the active version, roll back, or --force)"
        )
    _, kvs = await store.get_prefix(keys.instances_prefix(prefix, service))
    removed = []
    for kv in kvs:
        try:
            version = Instance.parse(kv.value).version
        except RecordError:
            continue  # invalid records are not gc's to judge; they are never served anyway
        if svc.spec.routes_version(version):
            continue
        if not dry_run:
            await store.replace(kv.key, None, mod_revision=kv.mod_revision)
        removed.append(kv.key)
    return removed


def _without_old(svc: Service) -> Service:
    """`svc` as gc would leave it: only instances of versions the spec routes."""
    kept = {n: i for n, i in svc.instances.items() if svc.spec.routes_version(i.version)}
    return dataclasses.replace(svc, instances=kept)


def _versions(svc: Service) -> str:
    return json.dumps(svc.versions()) if svc.instances else "none"


def parse_keep_old(text: str) -> timedelta:
    """A keep-old duration, at most MAX_KEEP_OLD_DAYS: what a date can still hold when
    added to now (a larger one used to pass `fluster app config` and fail mid-deploy)."""
    value = parse_duration(text)
    if value > timedelta(days=MAX_KEEP_OLD_DAYS):
        raise ValueError(f"at most {MAX_KEEP_OLD_DAYS}d, got {text!r}")
    return value


def parse_duration(text: str) -> timedelta:
    """`90s`, `10m`, `2h`, `1d`, or plain seconds."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 10m, 2h)") from None
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 10m, 2h)")
    try:
        return timedelta(seconds=value * units[unit])
    except OverflowError:
        raise ValueError(f"duration too long: {text!r}") from None


# -- certificates --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertListing:
    """What `fluster cert ls` shows: valid records, invalid ones with why, and users."""

    certs: dict[str, Certificate]
    invalid: dict[str, str]
    used_by: dict[str, list[str]]  # cert name -> services whose hosts it covers


async def add_cert(store: Store, prefix: str, name: str, pem: str, *, replace: bool) -> int:
    """Validate and write a certificate; without `replace`, only if the name is free."""
    cert = Certificate.parse(name, pem)
    key = keys.cert_key(prefix, cert.name)
    _, current = await store.get(key)
    if current is not None and not replace:
        raise Refused(f"certificate {name!r} exists; --replace to rotate it")
    # Compare-and-swap against what was read: two operators rotating at once conflict
    # (exit 3) instead of one silently undoing the other.
    return await store.replace(key, cert.pem, mod_revision=current.mod_revision if current else 0)


async def remove_cert(store: Store, prefix: str, name: str) -> int:
    validate_cert_name(name)
    if not await store.delete(keys.cert_key(prefix, name)):
        raise Refused(f"no certificate {name!r} (see `fluster cert ls`)")
    return 1


async def list_certs(store: Store, prefix: str) -> CertListing:
    root = keys.certs_prefix(prefix)
    _, kvs = await store.get_prefix(root)
    certs: dict[str, Certificate] = {}
    invalid: dict[str, str] = {}
    for kv in kvs:
        name = kv.key[len(root) :]
        try:
            certs[name] = Certificate.parse(name, kv.value)
        except RecordError as exc:
            invalid[name] = str(exc)
    snap = await snapshot(store, prefix)
    used_by = {
        name: sorted(
            svc.name for svc in snap.services.values() if any(map(cert.covers, svc.spec.hosts))
        )
        for name, cert in certs.items()
    }
    return CertListing(certs, invalid, used_by)
