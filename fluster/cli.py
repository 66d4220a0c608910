"""`fluster`: the operator's view of the registry and the levers of a deploy.

A thin layer: arguments in, `fluster.ops` does the work, a table (on a terminal) or
JSON (`--json`, for scripts) out. Exit codes are part of the interface; see EPILOG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from deployer import options as D
from fluster import __version__, keys, listing, ops, release
from fluster.catalog import Service
from fluster.records import (
    BALANCES,
    MAX_HSTS_SECONDS,
    MODES,
    RecordError,
    ReloaderStatus,
    validate_instance_name,
    validate_service_name,
    validate_version,
)
from fluster.runtime import run, setup_logging
from fluster.settings import (
    DOMAIN,
    ETCD_OPTIONS,
    PREFIX,
    Option,
    Problems,
    SettingsError,
    Values,
    add_options,
    etcd_settings,
    integer,
    log_level,
    number,
    one_of,
    resolve,
    switch,
)
from fluster.store import AuthError, Conflict, Store, StoreError, Unavailable

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CONFLICT, EXIT_REFUSED, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5

EPILOG = """\
exit status:
  0  done
  1  etcd unreachable, or another error
  2  bad arguments or an invalid value (nothing was written)
  3  conflict: someone else changed the record since it was read; read again and retry
  4  refused: not safe in the current state (e.g. too few instances of the version)
  5  written, but not every reloader applied it before --wait-timeout

Examples:
  fluster ls                          services, versions, instance counts
  fluster ls web                      web's instances
  fluster canary web 3f2a9c1 --weight 10
  fluster promote web 3f2a9c1 --min-instances 3
  fluster rollback web
"""


# -- the options of every subcommand, declared once ---------------------------------------


def _record(fn: Callable[[Any], Any]) -> Callable[[Any], str]:
    """A records validator (raises RecordError) as an option type (raises ValueError)."""

    def call(value: Any) -> str:
        try:
            return str(fn(value))
        except RecordError as exc:
            raise ValueError(exc.reason) from None

    return call


def _port_or_none(text: Any) -> int | str:
    return "none" if str(text) == "none" else integer(1, 65535)(text)


def _check_path(text: Any) -> str:
    value = str(text)
    if value != "none" and not value.startswith("/"):
        raise ValueError(f"want a path starting with '/' or 'none', got {text!r}")
    return value


SERVICE: Option[str] = Option(
    "service",
    None,
    "service name",
    "",
    _record(validate_service_name),
    kind="positional",
    metavar="SERVICE",
)
SERVICE_FILTER: Option[str | None] = Option(
    "service",
    None,
    "show this service's instances",
    None,
    _record(validate_service_name),
    kind="positional",
    nargs="?",
    metavar="SERVICE",
)
VERSION: Option[str] = Option(
    "version",
    None,
    "version (image tag, git ref)",
    "",
    _record(validate_version),
    kind="positional",
    metavar="VERSION",
)
INSTANCE: Option[str] = Option(
    "instance",
    None,
    "instance name",
    "",
    _record(validate_instance_name),
    kind="positional",
    metavar="INSTANCE",
)
JSON = switch("--json", None, "machine-readable output")
MODE: Option[str | None] = Option(
    "--mode", None, "http or tcp", None, one_of(*MODES), metavar="{http,tcp}"
)
HOSTS: Option[list[str] | None] = Option(
    "--host",
    None,
    "route this Host header (repeat for several; replaces the list)",
    None,
    list,
    kind="list",
    metavar="NAME",
)
NO_HOSTS = switch("--no-hosts", None, "back to {service}.{domain}")
PATH_PREFIX: Option[str | None] = Option(
    "--path-prefix", None, "route only requests under this path", None
)
SPEC_PORT: Option[int | str | None] = Option(
    "--port", None, "listening port (tcp mode), or 'none'", None, _port_or_none
)
BALANCE: Option[str | None] = Option(
    "--balance",
    None,
    "HAProxy balance algorithm: " + ", ".join(BALANCES),
    None,
    one_of(*BALANCES),
    metavar="ALGORITHM",
)
CHECK: Option[str | None] = Option(
    "--check", None, "HTTP health check path, or 'none'", None, _check_path, metavar="PATH"
)
CHECK_INTERVAL: Option[int | None] = Option(
    "--check-interval", None, "check interval (ms)", None, integer(100, 3_600_000), metavar="MS"
)
HTTPS: Option[str | None] = Option(
    "--https",
    None,
    "HTTPS policy: off, on, redirect, or default (redirect when a certificate covers "
    "one of its hosts, else off)",
    None,
    one_of("off", "on", "redirect", "default"),
    metavar="POLICY",
)
HSTS: Option[int | str | None] = Option(
    "--hsts-seconds",
    None,
    "Strict-Transport-Security max-age on HTTPS replies, or 'none'",
    None,
    lambda text: "none" if str(text) == "none" else integer(0, MAX_HSTS_SECONDS)(text),
    metavar="SECONDS",
)
MIN_INSTANCES: Option[int] = Option(
    "--min-instances",
    None,
    "refuse unless this many instances of VERSION are up",
    1,
    integer(0),
    metavar="N",
)
KEEP_OLD: Option[timedelta] = Option(
    "--keep-old",
    None,
    "keep old versions' records this long for a rollback (90s, 10m, 2h, 1d)",
    release.KEEP_OLD,
    lambda text: ops.parse_keep_old(str(text)),
    shown=ops.KEEP_OLD_TEXT,
    metavar="DURATION",
)
WEIGHT: Option[int] = Option(
    "--weight",
    None,
    "percent of traffic to VERSION, 0-100; 0 ends the canary",
    0,
    integer(0, 100),
    metavar="PERCENT",
    required=True,
)
NO_WAIT = switch("--no-wait", None, "do not wait for the reloaders to apply the change")
WAIT_TIMEOUT: Option[float] = Option(
    "--wait-timeout",
    None,
    "seconds to wait for every reloader",
    ops.WAIT_TIMEOUT_S,
    number(above=0),
    metavar="SECONDS",
)
GC_FORCE = switch(
    "--force",
    None,
    "ignore the --keep-old period, and remove even the version the service falls back to "
    "while its active version has no instance up",
)
PROMOTE_FORCE = switch(
    "--force",
    None,
    "promote even when no instance of VERSION is up (the service routes to nothing)",
)
DRY_RUN = switch("--dry-run", None, "only say what would go")
CERT_NAME: Option[str] = Option(
    "name", None, "record name, e.g. the host name it is for", "", kind="positional", metavar="NAME"
)
CERT_FILE: Option[str] = Option(
    "--cert", None, "PEM chain, leaf first", "", metavar="FILE", required=True
)
KEY_FILE: Option[str] = Option(
    "--key", None, "PEM private key (unencrypted)", "", metavar="FILE", required=True
)
REPLACE = switch("--replace", None, "rotate an existing certificate")
LOG_LEVEL = log_level("FLUSTER_LOG_LEVEL", "error")
WAIT = (NO_WAIT, WAIT_TIMEOUT)


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: its name, one line of help, and its options (run by `Cli.cmd_NAME`).
    A command with `actions` (`cert add|ls|rm`) takes one of them; `Cli.action` says which."""

    name: str
    help: str
    options: tuple[Option[Any], ...] = ()
    actions: tuple[Command, ...] = ()


COMMANDS: tuple[Command, ...] = (
    Command("ls", "list services (or one service's instances)", (SERVICE_FILTER, JSON)),
    Command(
        "spec",
        "show or edit a service's routing spec",
        (
            SERVICE,
            MODE,
            HOSTS,
            NO_HOSTS,
            PATH_PREFIX,
            SPEC_PORT,
            BALANCE,
            CHECK,
            CHECK_INTERVAL,
            HTTPS,
            HSTS,
            DOMAIN,
            JSON,
        ),
    ),
    Command(
        "promote",
        "route a service to one version; old instances retire",
        (SERVICE, VERSION, MIN_INSTANCES, KEEP_OLD, PROMOTE_FORCE, *WAIT),
    ),
    Command(
        "canary",
        "send a share of traffic to a version beside the active one",
        (SERVICE, VERSION, WEIGHT, *WAIT),
    ),
    Command(
        "rollback",
        "route back to the previous active version ((all) after the first promotion); "
        "of an app: start its previous version's containers again, then route back",
        (SERVICE, *WAIT, *D.ROLLBACK_APP),
    ),
    Command("drain", "stop sending new traffic to one instance", (SERVICE, INSTANCE, *WAIT)),
    Command(
        "gc",
        "remove records of versions a service no longer routes (of an app: their containers)",
        (SERVICE, GC_FORCE, DRY_RUN, D.DOCKER_HOST),
    ),
    Command(
        "cert",
        "TLS certificates the edges serve: add, ls, rm",
        actions=(
            Command(
                "add",
                "validate a certificate chain + key and store it in etcd",
                (CERT_NAME, CERT_FILE, KEY_FILE, REPLACE),
            ),
            Command("ls", "certificates: names, issuer, expiry, services using them", (JSON,)),
            Command("rm", "remove a certificate", (CERT_NAME,)),
        ),
    ),
    # Deploys: options in deployer.options (light: no Docker client), the work in
    # deployer.cli (loaded lazily).
    Command(
        "app",
        "the apps this host deploys: create, config, ls",
        actions=(
            Command("create", "make the app's config and git repository", D.APP_CREATE),
            Command("config", "show or change an app's config", D.APP_CONFIG),
            Command("ls", "apps, their active version and last deploy", (D.JSON,)),
            Command(
                "keys",
                "the ssh keys that may push an app: add, ls, rm (in authorized_keys)",
                actions=(
                    Command("add", "let a public key push the app", D.KEYS_ADD),
                    Command("ls", "the keys that may push the app", D.KEYS_LS),
                    Command("rm", "take the app from a key", D.KEYS_RM),
                ),
            ),
        ),
    ),
    Command("deploy", "build (or take) an image, start it beside the old one, promote", D.DEPLOY),
    Command("deploys", "an app's deploy history (the last 50)", D.DEPLOYS),
    Command("git-shell", "forced command of deploy keys: git push to its apps only", D.GIT_SHELL),
)
DEPLOY_COMMANDS = ("app", "deploy", "deploys")
GLOBAL: tuple[Option[Any], ...] = (*ETCD_OPTIONS, LOG_LEVEL)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluster",
        description="Operate the fluster registry: list services, promote, canary, roll back. "
        "Every global option is also an environment variable (shown in [env ...]).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fluster {__version__}")
    add_options(parser.add_argument_group("etcd"), ETCD_OPTIONS, environ)
    add_options(parser, (LOG_LEVEL,), environ)
    _add_commands(parser, COMMANDS, "command", environ)
    return parser


def _add_commands(
    parser: argparse.ArgumentParser,
    commands: Sequence[Command],
    dest: str,
    environ: Mapping[str, str],
) -> None:
    sub = parser.add_subparsers(
        dest=dest, required=True, metavar="COMMAND" if dest == "command" else "ACTION"
    )
    for command in commands:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_options(p, command.options, environ)
        if command.actions:
            _add_commands(
                p, command.actions, "sub" + dest if dest != "command" else "action", environ
            )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    action = next((c for c in command.actions if c.name == getattr(args, "action", "")), None)
    sub = (
        next((c for c in action.actions if c.name == getattr(args, "subaction", "")), None)
        if action
        else None
    )
    problems = Problems()
    options = (
        *GLOBAL,
        *command.options,
        *(action.options if action else ()),
        *(sub.options if sub else ()),
    )
    values = resolve(args, options, problems)
    settings = etcd_settings(values, problems)
    if problems.items:
        print(f"error: {SettingsError(problems.items)}", file=sys.stderr)
        return EXIT_USAGE
    if command.name == "git-shell":  # sshd's forced command: no etcd at all
        from deployer.gitshell import main as git_shell

        return git_shell(values[D.REPOS], environ, values[D.SHELL_KEY], values[D.SHELL_APPS])
    if sub is not None:  # app keys add|ls|rm: sshd's file, no etcd either
        from deployer.cli import fluster_command
        from deployer.deploykeys import main as deploy_keys

        return deploy_keys(
            sub.name,
            values[D.APP],
            values[D.KEY_NAME] if sub.name != "ls" else "",
            values[D.PUBLIC_KEY] if sub.name == "add" else "",
            Path(values[D.AUTHORIZED_KEYS]).expanduser(),
            fluster_command(),
            str(Path(values[D.REPOS]).resolve()) if sub.name == "add" else "",
        )
    exposed = settings.plaintext_off_loopback()
    if exposed and environ.get("FLUSTER_ETCD_PLAINTEXT_OK") != "1":
        print(
            f"fluster: warning: etcd at {', '.join(exposed)} is reached in plain text, off "
            "loopback: whoever else reaches it can rewrite the routing. Give it TLS client "
            "certificates (ETCD_CACERT, ETCD_CERT, ETCD_KEY; docs/SECURITY.md), or set "
            "FLUSTER_ETCD_PLAINTEXT_OK=1 where only the control plane can reach it.",
            file=sys.stderr,
        )
    # Results go to stdout, problems (and logs) to stderr.
    setup_logging(values[LOG_LEVEL], stream=sys.stderr)
    color = sys.stdout.isatty() and "NO_COLOR" not in environ
    cli = Cli(command.name, values, values[PREFIX], action.name if action else "", color)
    try:
        return run(cli.main(Store(settings)))
    except KeyboardInterrupt:
        return EXIT_ERROR


class Cli:
    def __init__(
        self, command: str, values: Values, prefix: str, action: str = "", color: bool = False
    ) -> None:
        self.command = command
        self.paint = listing.Paint(color)
        self.action = action
        self.v = values
        self.prefix = prefix

    async def main(self, store: Store) -> int:
        try:
            async with store:
                if self.command in DEPLOY_COMMANDS:
                    return await self.deployer(store)
                code: int = await getattr(self, "cmd_" + self.command)(store)
                return code
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
        live = await ops.reloaders(store, self.prefix)
        name = self.v[SERVICE_FILTER]
        if name and name not in snap.services:
            return fail(f"no service {name!r} in the registry", EXIT_ERROR)
        lags = await self._lags(store, live)
        if self.v[JSON]:
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
        counted = {r: await ops.changes_since(store, self.prefix, r) for r in revisions}
        return {k: counted[st.applied_revision] for k, st in live.items() if st is not None}

    async def cmd_cert(self, store: Store) -> int:
        if self.action == "ls":
            listing = await ops.list_certs(store, self.prefix)
            if self.v[JSON]:
                emit_json(certs_json(listing))
            else:
                print_certs(listing)
            return EXIT_OK
        name = self.v[CERT_NAME]
        if self.action == "rm":
            await ops.remove_cert(store, self.prefix, name)
            say(f"certificate {name}: removed")
            return EXIT_OK
        pem = _read(self.v[CERT_FILE], "--cert") + _read(self.v[KEY_FILE], "--key")
        revision = await ops.add_cert(store, self.prefix, name, pem, replace=self.v[REPLACE])
        say(f"certificate {name}: written at revision {revision}")
        return EXIT_OK

    # -- write --------------------------------------------------------------------------

    async def cmd_spec(self, store: Store) -> int:
        v, service = self.v, self.v[SERVICE]
        changes: dict[str, Any] = {}
        if v[MODE]:
            changes["mode"] = v[MODE]
        if v[HOSTS] or v[NO_HOSTS]:
            changes["hosts"] = [] if v[NO_HOSTS] else v[HOSTS]
        if v[PATH_PREFIX]:
            changes["path_prefix"] = v[PATH_PREFIX]
        port = v[SPEC_PORT]
        if port is not None:
            changes["port"] = None if port == "none" else port
        if v[BALANCE]:
            changes["balance"] = v[BALANCE]
        check, interval = v[CHECK], v[CHECK_INTERVAL]
        if check or interval:
            if check == "none":
                changes["check"] = None
            else:
                changes["check"] = {"path": check or "/", "interval_ms": interval or 2000}
        if v[HTTPS]:
            changes["https"] = None if v[HTTPS] == "default" else v[HTTPS]
        if v[HSTS] is not None:
            changes["hsts_seconds"] = None if v[HSTS] == "none" else v[HSTS]
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
            v[SERVICE],
            v[VERSION],
            keep_old=v[KEEP_OLD],
            min_instances=v[MIN_INSTANCES],
            force=v[PROMOTE_FORCE],
        )
        return await self._release(store, change)

    async def cmd_canary(self, store: Store) -> int:
        change = release.Release(self.v[SERVICE], self.v[VERSION], weight=self.v[WEIGHT])
        return await self._release(store, change)

    async def _release(self, store: Store, change: release.Release) -> int:
        within = None if self.v[NO_WAIT] else self.v[WAIT_TIMEOUT]
        await release.release(store, self.prefix, change, say=say, warn=warn, wait=within)
        return EXIT_OK

    async def deployer(self, store: Store) -> int:
        from deployer.cli import run as deploy_command

        return await deploy_command(self.command, self.action, self.v, store, self.prefix)

    async def cmd_rollback(self, store: Store) -> int:
        service = self.v[SERVICE]
        if (await store.get(keys.app_config_key(self.prefix, service)))[1] is not None:
            return await self.deployer(store)  # an app: its containers come back first
        return await self._release(store, release.Release(service))

    async def cmd_drain(self, store: Store) -> int:
        service, instance = self.v[SERVICE], self.v[INSTANCE]
        revision = await ops.drain(store, self.prefix, service, instance)
        say(f"{service}/{instance}: draining (revision {revision})")
        return await self._wait(store, revision)

    async def cmd_gc(self, store: Store) -> int:
        service, dry_run = self.v[SERVICE], self.v[DRY_RUN]
        app = (await store.get(keys.app_config_key(self.prefix, service)))[1] is not None
        if app and not dry_run:  # deploys that died mid-way go first, whatever else waits
            from deployer.cli import clean_abandoned

            await clean_abandoned(self.v, store, self.prefix)
        removed = await ops.gc(store, self.prefix, service, force=self.v[GC_FORCE], dry_run=dry_run)
        verb = "would remove" if dry_run else "removed"
        say(f"{service}: {verb} {len(removed)} record(s) of old versions")
        for key in removed:
            say(f"  {key}")
        if app:
            return await self.deployer(store)  # an app: its old versions' containers too
        return EXIT_OK

    async def _wait(self, store: Store, revision: int) -> int:
        if not self.v[NO_WAIT]:
            await release.wait_for_edges(
                store, self.prefix, revision, within=self.v[WAIT_TIMEOUT], say=say
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


if __name__ == "__main__":
    sys.exit(main())
