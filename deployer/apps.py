"""App configs and deploy records in etcd: read, validated write, history trimmed to 50.

Config writes compare the mod revision they read (as `fluster.ops` does for specs), so two
operators editing one app cannot silently overwrite each other. Deploy ids sort by time
(`20261130T181502.123Z-3f2a9c1`), so the history is a prefix read in key order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from deployer.records import KEEP_DEPLOYS, AppConfig, DeployRecord, validate_app_name
from fluster import keys
from fluster.ops import Refused
from fluster.records import RecordError, ServiceSpec
from fluster.store import Conflict, Store

KEEP_RELEASES = 10  # the newest releases kept whatever else is trimmed


class NoSuchApp(Exception):
    """The app has no config in etcd (`fluster app create` it first)."""


@dataclass(frozen=True, slots=True)
class Loaded:
    config: AppConfig
    revision: int  # the config's mod revision, for a compare-and-swap write


def deploy_id(now: datetime, version: str) -> str:
    stamp = now.strftime("%Y%m%dT%H%M%S") + f".{now.microsecond // 1000:03d}Z"
    return f"{stamp}-{version[:7]}" if version else stamp


async def load(store: Store, prefix: str, app: str) -> Loaded:
    validate_app_name(app)
    _, kv = await store.get(keys.app_config_key(prefix, app))
    if kv is None:
        raise NoSuchApp(f"no app {app!r} (create it with `fluster app create {app}`)")
    try:
        return Loaded(AppConfig.parse(kv.value), kv.mod_revision)
    except RecordError as exc:
        raise RecordError(exc.field, f"{exc.reason} (in the stored config of {app})") from None


async def claim(store: Store, prefix: str, app: str, service: str) -> None:
    """Make `service` belong to `app`, or refuse naming the app it belongs to.

    The first app to claim a service keeps it (a create-if-absent write), as the first
    service to claim a host keeps that: the sidekick registers no other app's container
    in it, so one app's push can never put its containers behind another's name.
    """
    key = keys.owner_key(prefix, service)
    for _ in range(2):
        _, kv = await store.get(key)
        if kv is not None:
            owner = kv.value.decode(errors="replace")
            if owner != app:
                raise Refused(f"service {service} belongs to app {owner}; choose another service")
            return
        try:
            await store.replace(key, app, mod_revision=0)
            return
        except Conflict:
            continue  # another app claimed it just now: read who
    raise Refused(f"service {service}: its owner changed twice while claiming it; retry")


async def release(store: Store, prefix: str, app: str, service: str) -> None:
    """`service` no longer belongs to `app` (its config names another)."""
    key = keys.owner_key(prefix, service)
    _, kv = await store.get(key)
    if kv is not None and kv.value.decode(errors="replace") == app:
        with contextlib.suppress(Conflict):  # changed hands meanwhile: not ours to delete
            await store.replace(key, None, mod_revision=kv.mod_revision)


async def create(store: Store, prefix: str, app: str, changes: dict[str, Any]) -> AppConfig:
    """Write a new app's config; Conflict if it exists (another create won).
    Refused if its service belongs to another app."""
    config = AppConfig.from_dict({"service": validate_app_name(app), **changes})
    if (await store.get(keys.app_config_key(prefix, app)))[1] is not None:
        raise Conflict(f"app {app} exists")
    await claim(store, prefix, app, config.service)
    await store.replace(keys.app_config_key(prefix, app), config.to_json(), mod_revision=0)
    return config


async def edit(store: Store, prefix: str, app: str, changes: dict[str, Any]) -> AppConfig:
    loaded = await load(store, prefix, app)
    config = loaded.config.replace(**changes)
    await claim(store, prefix, app, config.service)
    await store.replace(
        keys.app_config_key(prefix, app), config.to_json(), mod_revision=loaded.revision
    )
    if config.service != loaded.config.service:
        await release(store, prefix, app, loaded.config.service)
    return config


async def all_apps(store: Store, prefix: str) -> dict[str, AppConfig | RecordError]:
    _, kvs = await store.get_prefix(keys.apps_prefix(prefix))
    out: dict[str, AppConfig | RecordError] = {}
    for kv in kvs:
        app, _, rest = kv.key[len(keys.apps_prefix(prefix)) :].partition("/")
        if rest != "config":
            continue
        try:
            out[app] = AppConfig.parse(kv.value)
        except RecordError as exc:
            out[app] = exc
    return out


async def abandoned(store: Store, prefix: str, app: str) -> list[DeployRecord]:
    """Deploys recorded as running that do not hold the app's lock: their process died.
    (A deploy writes its record only once it holds the lock.)"""
    _, lock = await store.get(keys.app_lock_key(prefix, app))
    holder = lock.value.decode(errors="replace") if lock else None
    return [
        rec
        for rec in await history(store, prefix, app)
        if isinstance(rec, DeployRecord) and rec.result == "running" and rec.id != holder
    ]


async def routed(store: Store, prefix: str, app: str) -> Callable[[str], bool]:
    """Which versions of the app its service's spec still routes (keep those); when the
    spec cannot be read, every version is kept: removing is what cannot be undone."""
    try:
        service = (await load(store, prefix, app)).config.service
        _, kv = await store.get(keys.spec_key(prefix, service))
        spec = ServiceSpec.parse(kv.value) if kv else ServiceSpec()
    except (RecordError, NoSuchApp):
        return lambda version: True
    return spec.routes_version


async def record(store: Store, prefix: str, rec: DeployRecord) -> None:
    await store.put(keys.deploy_key(prefix, rec.app, rec.id), rec.to_json())


async def trim(store: Store, prefix: str, app: str, keep: int = KEEP_DEPLOYS) -> int:
    """Delete all but the newest `keep` deploy records, never one of the newest
    KEEP_RELEASES releases (a run of failed pushes takes no rollback away); returns how
    many went."""
    _, kvs = await store.get_prefix(keys.deploys_prefix(prefix, app))
    if len(kvs) <= keep:
        return 0
    ordered = sorted(kvs, key=lambda kv: kv.key)
    numbered = [kv.key for kv in ordered if _number_of(kv.value)]
    kept = {kv.key for kv in ordered[-keep:]} | set(numbered[-KEEP_RELEASES:])
    old = [kv.key for kv in ordered if kv.key not in kept]
    for key in old:
        await store.delete(key)
    return len(old)


def _number_of(raw: bytes) -> int:
    try:
        return DeployRecord.parse(raw).number
    except RecordError:
        return 0


def releases(records: list[DeployRecord | RecordError]) -> list[DeployRecord]:
    """The records that are releases (numbered), oldest first."""
    return [r for r in records if isinstance(r, DeployRecord) and r.number]


def next_number(records: list[DeployRecord | RecordError]) -> int:
    return max((r.number for r in releases(records)), default=0) + 1


def digest(config: AppConfig, image: str, command: str) -> str:
    """What a release runs, in six hex digits: its image, command and runtime config."""
    what = json.dumps([image, command, config.runtime()], sort_keys=True)
    return hashlib.sha256(what.encode()).hexdigest()[:6]


def version_for(
    records: list[DeployRecord | RecordError],
    base: str,
    config: AppConfig,
    image: str,
    command: str,
) -> str:
    """The version a release of `image` with `config` runs as.

    A version names what its containers run, because routing, rollback and stopped
    containers go by version. A code release is its commit (`base`, as pushed) unless
    that version already ran with another config or command; then, like a config release
    (same image, new config), it is `{base}-{digest}`: the same config again is the same
    version, so its stopped containers serve a rollback to it.
    """
    mine = digest(config, image, command)
    for rec in releases(records):
        if rec.version == base and digest(rec.config(config), rec.image, rec.command) != mine:
            return f"{base[:48]}-{mine}"
    return base


def find_release(records: list[DeployRecord | RecordError], which: str) -> DeployRecord | None:
    """The release `which` names: `v7` (its number) or a git sha / version (its newest)."""
    found = releases(records)
    if which[:1] in "vV" and which[1:].isdigit():
        return next((r for r in found if r.number == int(which[1:])), None)
    matches = [r for r in found if r.version == which or r.version.startswith(which)]
    return matches[-1] if len(which) >= 4 and matches else None


async def history(store: Store, prefix: str, app: str) -> list[DeployRecord | RecordError]:
    """Deploy records, oldest first; an unreadable one is returned as its error."""
    _, kvs = await store.get_prefix(keys.deploys_prefix(prefix, app))
    out: list[DeployRecord | RecordError] = []
    for kv in sorted(kvs, key=lambda kv: kv.key):
        try:
            out.append(DeployRecord.parse(kv.value))
        except RecordError as exc:
            out.append(exc)
    return out
