"""What each `fluster` subcommand does: the values in, `fluster.ops` (or the deployer)
does the work, a table (on a terminal) or JSON (`--json`) out. Exit codes are part of
the interface (`fluster --help` lists them)."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from fluster import analysis, edges, keys, listing, ops, release
from fluster import options as O
from fluster.catalog import Service
from fluster.records import (
    RecordError,
    ReloaderStatus,
)
from fluster.settings import (
    DOMAIN,
    Values,
)
from fluster.store import AuthError, Conflict, Store, StoreError, Unavailable

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFLICT, EXIT_REFUSED, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5


class Cli:
    def __init__(
        self, command: str, values: Values, prefix: str, action: str = "", color: bool = False
    ) -> None:
        self.command = command
        self.paint = listing.Paint(color)
        self.action = action
        self.v = values
        self.prefix = prefix
        self.handlers: dict[str, Callable[[Store], Awaitable[int]]] = {
            "ls": self.cmd_ls,
            "spec": self.cmd_spec,
            "cert": self.cmd_cert,
            "promote": self.cmd_promote,
            "canary": self.cmd_canary,
            "rollback": self.cmd_rollback,
            "drain": self.cmd_drain,
            "gc": self.cmd_gc,
            "app": self.deployer,  # these: deployer/cli.py
            "deploy": self.deployer,
            "deploys": self.deployer,
            "releases": self.deployer,
            "scale": self.deployer,
            "logs": self.deployer,
            "run": self.deployer,
            "retire": self.deployer,
        }

    async def main(self, store: Store) -> int:
        try:
            async with store:
                return await self.handlers[self.command](store)
        except RecordError as exc:
            return fail(f"invalid value: {exc}", EXIT_USAGE)
        except ops.Refused as exc:
            return fail(f"refused: {exc}", EXIT_REFUSED)
        except Conflict as exc:
            return fail(
                f"conflict: {exc}; nothing was written, read again and retry", EXIT_CONFLICT
            )
        except ops.WaitTimeout as exc:
            return fail(f"written, but {exc}", EXIT_TIMEOUT)
        except AuthError as exc:
            return fail(f"etcd refused us: {exc}", EXIT_ERROR)
        except Unavailable as exc:
            return fail(f"etcd unreachable: {exc}", EXIT_ERROR)
        except StoreError as exc:
            return fail(f"etcd error: {exc}", EXIT_ERROR)

    # -- read ---------------------------------------------------------------------------

    async def cmd_ls(self, store: Store) -> int:
        snap = await ops.snapshot(store, self.prefix)
        live = await edges.reloaders(store, self.prefix)
        name = self.v[O.SERVICE_FILTER]
        if name and name not in snap.services:
            return fail(f"no service {name!r} in the registry", EXIT_ERROR)
        lags = await self._lags(store, live)
        if self.v[O.JSON]:
            emit_json(listing.ls_json(snap, live, lags, name))
        elif name:
            print(listing.instances_text(snap.services[name], datetime.now(UTC), self.paint))
        else:
            print(listing.services_text(snap, live, lags, self.paint))
        return EXIT_OK

    async def _lags(
        self, store: Store, live: Mapping[str, ReloaderStatus | None]
    ) -> dict[str, int | None]:
        """Each live reloader's distance from etcd, counted once per distinct revision."""
        revisions = {st.applied_revision for st in live.values() if st is not None}
        counted = {r: await edges.changes_since(store, self.prefix, r) for r in revisions}
        return {k: counted[st.applied_revision] for k, st in live.items() if st is not None}

    async def cmd_cert(self, store: Store) -> int:
        if self.action == "ls":
            listing = await ops.list_certs(store, self.prefix)
            if self.v[O.JSON]:
                emit_json(certs_json(listing))
            else:
                print_certs(listing)
            return EXIT_OK
        name = self.v[O.CERT_NAME]
        if self.action == "rm":
            await ops.remove_cert(store, self.prefix, name)
            say(f"certificate {name}: removed")
            return EXIT_OK
        pem = _read(self.v[O.CERT_FILE], "--cert") + _read(self.v[O.KEY_FILE], "--key")
        revision = await ops.add_cert(store, self.prefix, name, pem, replace=self.v[O.REPLACE])
        say(f"certificate {name}: written at revision {revision}")
        return EXIT_OK

    # -- write --------------------------------------------------------------------------

    async def cmd_spec(self, store: Store) -> int:
        v, service = self.v, self.v[O.SERVICE]
        changes: dict[str, Any] = {}
        if v[O.MODE]:
            changes["mode"] = v[O.MODE]
        if v[O.HOSTS] or v[O.NO_HOSTS]:
            changes["hosts"] = [] if v[O.NO_HOSTS] else v[O.HOSTS]
        if v[O.PATH_PREFIX]:
            changes["path_prefix"] = v[O.PATH_PREFIX]
        port = v[O.SPEC_PORT]
        if port is not None:
            changes["port"] = None if port == "none" else port
        if v[O.BALANCE]:
            changes["balance"] = v[O.BALANCE]
        check, interval = v[O.CHECK], v[O.CHECK_INTERVAL]
        if check or interval:
            if check == "none":
                changes["check"] = None
            else:
                changes["check"] = {"path": check or "/", "interval_ms": interval or 2000}
        if v[O.HTTPS]:
            changes["https"] = None if v[O.HTTPS] == "default" else v[O.HTTPS]
        if v[O.HSTS] is not None:
            changes["hsts_seconds"] = None if v[O.HSTS] == "none" else v[O.HSTS]
        if not changes:
            _, found, invalid = await ops.read_for_write(store, self.prefix, service)
            if invalid:
                why, shown = invalid.reason, invalid.start
                warn(f"{service}: the spec in etcd is invalid ({why}); shown: {shown}")
            emit_json((found or Service(name=service)).spec.to_dict())
            return EXIT_OK
        written = await ops.edit_spec(store, self.prefix, service, changes, domain=v[DOMAIN])
        release.warn_replaced(service, written, warn)
        say(f"{service}: spec written at revision {written.revision}")
        return EXIT_OK

    async def cmd_promote(self, store: Store) -> int:
        v = self.v
        change = release.Release(
            v[O.SERVICE],
            v[O.VERSION],
            keep_old=v[O.KEEP_OLD],
            min_instances=v[O.MIN_INSTANCES],
            force=v[O.PROMOTE_FORCE],
        )
        return await self._release(store, change)

    async def cmd_canary(self, store: Store) -> int:
        v = self.v
        service, version, weight = v[O.SERVICE], v[O.VERSION], v[O.WEIGHT]
        if v[O.STEPS]:
            return await self._analysed_canary(store, service, version)
        assert weight is not None  # fluster.cli refused the command without one
        return await self._release(store, release.Release(service, version, weight=weight))

    async def _analysed_canary(self, store: Store, service: str, version: str) -> int:
        """`--steps`: walk the canary through them, judged by the edges' counters, then
        promote; a step over the bar rolls it back (exit 4)."""
        v = self.v
        snap = await ops.snapshot(store, self.prefix)
        active = snap.services[service].spec.active_version if service in snap.services else None
        if active is None:
            raise ops.Refused(f"{service} has no active version to compare {version} with")
        bar = analysis.Bar(
            v[O.STEPS], v[O.INTERVAL], v[O.MAX_ERRORS], v[O.MIN_REQUESTS], v[O.MAX_LATENCY]
        )
        try:
            await analysis.analyse(
                store, self.prefix, service, version, active, bar, say=say, warn=warn,
                wait=v[O.WAIT_TIMEOUT],
            )  # fmt: skip
        except analysis.CanaryFailed as exc:
            return fail(f"canary failed: {exc}", EXIT_REFUSED)
        return await self._release(store, release.Release(service, version))

    async def _release(self, store: Store, change: release.Release) -> int:
        within = None if self.v[O.NO_WAIT] else self.v[O.WAIT_TIMEOUT]
        await release.release(store, self.prefix, change, say=say, warn=warn, wait=within)
        return EXIT_OK

    async def deployer(self, store: Store) -> int:
        from deployer.cli import run as deploy_command

        return await deploy_command(self.command, self.action, self.v, store, self.prefix)

    async def cmd_rollback(self, store: Store) -> int:
        service = self.v[O.SERVICE]
        if (await store.get(keys.app_config_key(self.prefix, service)))[1] is not None:
            return await self.deployer(store)  # an app: its containers come back first
        return await self._release(store, release.Release(service))

    async def cmd_drain(self, store: Store) -> int:
        service, instance = self.v[O.SERVICE], self.v[O.INSTANCE]
        revision = await ops.drain(store, self.prefix, service, instance)
        say(f"{service}/{instance}: draining (revision {revision})")
        return await self._wait(store, revision)

    async def cmd_gc(self, store: Store) -> int:
        service, dry_run = self.v[O.SERVICE], self.v[O.DRY_RUN]
        app = (await store.get(keys.app_config_key(self.prefix, service)))[1] is not None
        if app and not dry_run:  # deploys that died mid-way go first, whatever else waits
            from deployer.cli import clean_abandoned

            await clean_abandoned(self.v, store, self.prefix)
        removed = await ops.gc(
            store, self.prefix, service, force=self.v[O.GC_FORCE], dry_run=dry_run
        )
        verb = "would remove" if dry_run else "removed"
        say(f"{service}: {verb} {len(removed)} record(s) of old versions")
        for key in removed:
            say(f"  {key}")
        if app:
            return await self.deployer(store)  # an app: its old versions' containers too
        return EXIT_OK

    async def _wait(self, store: Store, revision: int) -> int:
        if not self.v[O.NO_WAIT]:
            await release.wait_for_edges(
                store, self.prefix, revision, within=self.v[O.WAIT_TIMEOUT], say=say
            )
        return EXIT_OK


# -- output ------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def warn(text: str) -> None:
    """Something the user should know that did not stop the command: stderr, one line."""
    print(f"fluster: warning: {text}", file=sys.stderr, flush=True)


def fail(message: str, code: int) -> int:
    print(f"fluster: {message}", file=sys.stderr)
    return code


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _read(path: str, name: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read(1 << 20)
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(name, f"cannot read {path}: {exc}") from None
    return text if text.endswith("\n") else text + "\n"


def certs_json(listing: ops.CertListing) -> dict[str, Any]:
    return {
        "certs": {
            name: {
                "names": list(cert.names),
                "issuer": cert.issuer,
                "not_before": cert.not_before.isoformat(),
                "not_after": cert.not_after.isoformat(),
                "fingerprint_sha256": cert.fingerprint,
                "services": listing.used_by.get(name, []),
            }
            for name, cert in listing.certs.items()
        },
        "invalid": listing.invalid,
    }


def print_certs(certs: ops.CertListing) -> None:
    rows = [["CERT", "NAMES", "ISSUER", "EXPIRES", "SERVICES"]]
    for name, cert in certs.certs.items():
        rows.append(
            [
                name,
                ",".join(cert.names),
                cert.issuer,
                cert.not_after.strftime("%Y-%m-%d %H:%M UTC"),
                ",".join(certs.used_by.get(name, [])) or "-",
            ]
        )
    print("\n".join(listing.table(rows)) if len(rows) > 1 else "no certificates")
    for name, why in certs.invalid.items():
        print(f"invalid, not served: {name}: {why}")
