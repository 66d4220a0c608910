"""`fluster`: the operator's view of the registry and the levers of a deploy.

A thin layer: arguments in, `fluster.ops` does the work, a table (on a terminal) or
JSON (`--json`, for scripts) out. Exit codes are part of the interface; see EPILOG.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from fluster import __version__, ops
from fluster.catalog import Service, Snapshot
from fluster.records import RecordError
from fluster.runtime import run, setup_logging
from fluster.settings import (
    Problems,
    SettingsError,
    add_etcd_options,
    etcd_settings,
    exit_on_problems,
    prefix_setting,
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


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluster",
        description="Operate the fluster registry: list services, promote, canary, roll back.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fluster {__version__}")
    add_etcd_options(parser, environ)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return p

    p = command("ls", "list services (or one service's instances)")
    p.add_argument("service", nargs="?", help="show this service's instances")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("spec", "show or edit a service's routing spec")
    p.add_argument("service")
    p.add_argument("--mode", choices=["http", "tcp"])
    p.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="NAME",
        help="route this Host header (repeat for several; replaces the list)",
    )
    p.add_argument("--no-hosts", action="store_true", help="back to {service}.{domain}")
    p.add_argument("--path-prefix", help="route only requests under this path")
    p.add_argument("--port", help="listening port (tcp mode), or 'none'")
    p.add_argument("--balance", help="HAProxy balance algorithm (roundrobin, leastconn, ...)")
    p.add_argument("--check", metavar="PATH", help="HTTP health check path, or 'none'")
    p.add_argument("--check-interval", type=int, metavar="MS", help="check interval (ms)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("promote", "route a service to one version; old instances retire")
    p.add_argument("service")
    p.add_argument("version")
    p.add_argument(
        "--min-instances",
        type=int,
        default=1,
        help="refuse unless this many instances of VERSION are up (default: 1)",
    )
    p.add_argument(
        "--keep-old",
        default="10m",
        help="keep old versions' records this long for a rollback (default: 10m)",
    )
    _wait_options(p)

    p = command("canary", "send a share of traffic to a version beside the active one")
    p.add_argument("service")
    p.add_argument("version")
    p.add_argument("--weight", type=int, required=True, help="percent to VERSION; 0 ends it")
    _wait_options(p)

    p = command("rollback", "route back to the previous active version")
    p.add_argument("service")
    _wait_options(p)

    p = command("drain", "stop sending new traffic to one instance")
    p.add_argument("service")
    p.add_argument("instance")
    _wait_options(p)

    p = command("gc", "remove records of versions a service no longer routes")
    p.add_argument("service")
    p.add_argument("--force", action="store_true", help="ignore the --keep-old period")
    p.add_argument("--dry-run", action="store_true", help="only say what would go")

    p = command("cert", "TLS certificates the edges serve: add, ls, rm")
    certs = p.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    c = certs.add_parser("add", help="validate a certificate chain + key and store it in etcd")
    c.add_argument("name", help="record name, e.g. the host name it is for")
    c.add_argument("--cert", required=True, metavar="FILE", help="PEM chain, leaf first")
    c.add_argument("--key", required=True, metavar="FILE", help="PEM private key (unencrypted)")
    c.add_argument("--replace", action="store_true", help="rotate an existing certificate")
    c = certs.add_parser("ls", help="certificates: names, issuer, expiry, services using them")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c = certs.add_parser("rm", help="remove a certificate")
    c.add_argument("name")
    return parser


def _wait_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-wait", action="store_true", help="do not wait for the reloaders to apply the change"
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for every reloader (default: 30)",
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args = build_parser(environ).parse_args(argv)
    problems = Problems()
    settings = etcd_settings(args, problems)
    prefix = prefix_setting(args, problems)
    keep_old = problems.convert(
        "--keep-old", getattr(args, "keep_old", "0"), ops.parse_duration, timedelta()
    )
    try:
        problems.raise_if_any()
    except SettingsError as exc:
        exit_on_problems(exc)
    setup_logging("error", stream=sys.stderr)  # results go to stdout, problems to stderr
    cli = Cli(args, prefix, keep_old)
    try:
        return run(cli.main(Store(settings)))
    except KeyboardInterrupt:
        return EXIT_ERROR


class Cli:
    def __init__(self, args: argparse.Namespace, prefix: str, keep_old: timedelta) -> None:
        self.args = args
        self.prefix = prefix
        self.keep_old = keep_old

    async def main(self, store: Store) -> int:
        try:
            async with store:
                code: int = await getattr(self, "cmd_" + self.args.command)(store)
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
        name = self.args.service
        if name and name not in snap.services:
            return fail(f"no service {name!r} in the registry", EXIT_ERROR)
        if self.args.json:
            emit_json(ls_json(snap, live, name))
        elif name:
            print_instances(snap.services[name])
        else:
            print_services(snap, live)
        return EXIT_OK

    async def cmd_cert(self, store: Store) -> int:
        a = self.args
        if a.cert_command == "ls":
            listing = await ops.list_certs(store, self.prefix)
            if a.json:
                emit_json(certs_json(listing))
            else:
                print_certs(listing)
            return EXIT_OK
        if a.cert_command == "rm":
            await ops.remove_cert(store, self.prefix, a.name)
            say(f"certificate {a.name}: removed")
            return EXIT_OK
        pem = _read(a.cert, "--cert") + _read(a.key, "--key")
        revision = await ops.add_cert(store, self.prefix, a.name, pem, replace=a.replace)
        say(f"certificate {a.name}: written at revision {revision}")
        return EXIT_OK

    # -- write --------------------------------------------------------------------------

    async def cmd_spec(self, store: Store) -> int:
        a = self.args
        changes: dict[str, Any] = {}
        if a.mode:
            changes["mode"] = a.mode
        if a.hosts or a.no_hosts:
            changes["hosts"] = [] if a.no_hosts else a.hosts
        if a.path_prefix:
            changes["path_prefix"] = a.path_prefix
        if a.port:
            changes["port"] = None if a.port == "none" else _int(a.port, "--port")
        if a.balance:
            changes["balance"] = a.balance
        if a.check or a.check_interval:
            if a.check == "none":
                changes["check"] = None
            else:
                changes["check"] = {"path": a.check or "/", "interval_ms": a.check_interval or 2000}
        if not changes:
            snap = await ops.snapshot(store, self.prefix)
            svc = snap.services.get(a.service) or Service(name=a.service)
            emit_json(svc.spec.to_dict())
            return EXIT_OK
        written = await ops.edit_spec(store, self.prefix, a.service, changes)
        say(f"{a.service}: spec written at revision {written.revision}")
        return EXIT_OK

    async def cmd_promote(self, store: Store) -> int:
        a = self.args
        written = await ops.promote(
            store,
            self.prefix,
            a.service,
            a.version,
            min_instances=a.min_instances,
            keep_old=self.keep_old,
        )
        say(
            f"{a.service}: {a.version} is now the active version (revision {written.revision}); "
            f"old instances retire, records kept until {written.spec.keep_old_until}"
        )
        return await self._wait(store, written.revision)

    async def cmd_canary(self, store: Store) -> int:
        a = self.args
        written = await ops.canary(store, self.prefix, a.service, a.version, a.weight)
        share = f"{a.weight}% to {a.version}" if a.weight else "canary ended"
        say(f"{a.service}: {share} (revision {written.revision})")
        return await self._wait(store, written.revision)

    async def cmd_rollback(self, store: Store) -> int:
        written = await ops.rollback(store, self.prefix, self.args.service)
        say(
            f"{self.args.service}: rolled back to {written.spec.active_version} "
            f"(revision {written.revision})"
        )
        return await self._wait(store, written.revision)

    async def cmd_drain(self, store: Store) -> int:
        a = self.args
        revision = await ops.drain(store, self.prefix, a.service, a.instance)
        say(f"{a.service}/{a.instance}: draining (revision {revision})")
        return await self._wait(store, revision)

    async def cmd_gc(self, store: Store) -> int:
        a = self.args
        removed = await ops.gc(store, self.prefix, a.service, force=a.force, dry_run=a.dry_run)
        verb = "would remove" if a.dry_run else "removed"
        say(f"{a.service}: {verb} {len(removed)} record(s) of old versions")
        for key in removed:
            say(f"  {key}")
        return EXIT_OK

    async def _wait(self, store: Store, revision: int) -> int:
        if self.args.no_wait:
            return EXIT_OK

        def progress(done: int, total: int, behind: list[str]) -> None:
            if total:
                waiting = f"; waiting for {', '.join(behind)}" if behind else ""
                say(f"  reloaders applied: {done}/{total}{waiting}")

        count = await ops.wait_applied(
            store, self.prefix, revision, within=self.args.wait_timeout, progress=progress
        )
        if not count:
            say("  no live reloader is registered: nothing to wait for")
        return EXIT_OK


# -- output ------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def fail(message: str, code: int) -> int:
    print(f"fluster: {message}", file=sys.stderr)
    return code


def emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RecordError(name, f"must be an integer, got {text!r}") from None


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


def print_certs(listing: ops.CertListing) -> None:
    rows = [["CERT", "NAMES", "ISSUER", "EXPIRES", "SERVICES"]]
    for name, cert in listing.certs.items():
        rows.append(
            [
                name,
                ",".join(cert.names),
                cert.issuer,
                cert.not_after.strftime("%Y-%m-%d %H:%M UTC"),
                ",".join(listing.used_by.get(name, [])) or "-",
            ]
        )
    if len(rows) > 1:
        table(rows)
    else:
        print("no certificates")
    for name, why in listing.invalid.items():
        print(f"invalid, not served: {name}: {why}")


def ls_json(snap: Snapshot, live: Mapping[str, Any], only: str | None) -> dict[str, Any]:
    services = {}
    for name, svc in snap.services.items():
        if only and name != only:
            continue
        services[name] = {
            "spec": svc.spec.to_dict(),
            "has_spec": svc.has_spec,
            "versions": svc.versions(),
            "instances": {
                iname: {**json.loads(inst.to_json()), "routed": iname in svc.routed()}
                for iname, inst in svc.instances.items()
            },
        }
    return {
        "revision": snap.revision,
        "services": services,
        "rejected": dict(snap.rejected),
        "reloaders": {
            k: (None if v is None else {"applied_revision": v.applied_revision, "node": v.node})
            for k, v in live.items()
        },
    }


def table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def print_services(snap: Snapshot, live: Mapping[str, Any]) -> None:
    rows = [["SERVICE", "MODE", "ACTIVE", "CANARY", "UP", "DRAINING", "VERSIONS"]]
    for name, svc in snap.services.items():
        states = [i.state for i in svc.instances.values()]
        spec = svc.spec
        canary = f"{spec.canary.version} {spec.canary.weight}%" if spec.canary else "-"
        versions = " ".join(f"{v or '(none)'}:{n}" for v, n in svc.versions().items()) or "-"
        rows.append(
            [
                name,
                spec.mode,
                spec.active_version or "(all)",
                canary,
                str(states.count("up")),
                str(states.count("draining")),
                versions,
            ]
        )
    if len(rows) > 1:
        table(rows)
    else:
        print("no services registered")
    applied = [f"{k}@{v.applied_revision}" if v else f"{k}@?" for k, v in live.items()]
    print(
        f"\nrevision {snap.revision}; reloaders: {', '.join(applied) or 'none'}"
        + (f"; {len(snap.rejected)} invalid record(s) skipped" if snap.rejected else "")
    )


def print_instances(svc: Service) -> None:
    routed = svc.routed()
    rows = [["INSTANCE", "ADDRESS", "VERSION", "STATE", "WEIGHT", "NODE", "ROUTED"]]
    for name, inst in svc.instances.items():
        rows.append(
            [
                name,
                inst.address,
                inst.version or "-",
                inst.state,
                str(inst.weight),
                inst.node or "-",
                "yes" if name in routed else "no",
            ]
        )
    table(rows)
