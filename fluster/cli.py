"""`fluster`: the operator's view of the registry and the levers of a deploy.

The commands, their options (fluster/options.py) and the parser; what each command does
is in fluster/commands.py. Exit codes are part of the interface; see EPILOG.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer import options as D
from fluster import __version__
from fluster import options as O
from fluster.commands import EXIT_ERROR, EXIT_USAGE, Cli
from fluster.runtime import run, setup_logging
from fluster.settings import (
    DOMAIN,
    ETCD_OPTIONS,
    PREFIX,
    HelpFormatter,
    Option,
    Problems,
    SettingsError,
    add_options,
    etcd_settings,
    resolve,
)
from fluster.store import open_store

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


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: its name, one line of help, and its options (run by
    `Cli.handlers[name]`, fluster/commands.py).
    A command with `actions` (`cert add|ls|rm`) takes one of them; `Cli.action` says which."""

    name: str
    help: str
    options: tuple[Option[Any], ...] = ()
    actions: tuple[Command, ...] = ()


COMMANDS: tuple[Command, ...] = (
    Command("ls", "list services (or one service's instances)", (O.SERVICE_FILTER, O.JSON)),
    Command(
        "spec",
        "show or edit a service's routing spec",
        (
            O.SERVICE,
            O.MODE,
            O.HOSTS,
            O.NO_HOSTS,
            O.PATH_PREFIX,
            O.SPEC_PORT,
            O.BALANCE,
            O.CHECK,
            O.CHECK_INTERVAL,
            O.HTTPS,
            O.HSTS,
            DOMAIN,
            O.JSON,
        ),
    ),
    Command(
        "promote",
        "route a service to one version; old instances retire",
        (O.SERVICE, O.VERSION, O.MIN_INSTANCES, O.KEEP_OLD, O.PROMOTE_FORCE, *O.WAIT),
    ),
    Command(
        "canary",
        "send a share of traffic to a version beside the active one; with --steps, walk it "
        "through shares judged by the edges' counters, then promote it (or roll it back)",
        (O.SERVICE, O.VERSION, O.WEIGHT, *O.ANALYSIS, *O.WAIT),
    ),
    Command(
        "rollback",
        "route back to the previous active version ((all) after the first promotion); "
        "of an app: start its previous version's containers again, then route back",
        (O.SERVICE, *O.WAIT, *D.ROLLBACK_APP),
    ),
    Command("drain", "stop sending new traffic to one instance", (O.SERVICE, O.INSTANCE, *O.WAIT)),
    Command(
        "gc",
        "remove records of versions a service no longer routes (of an app: their containers, "
        "and its images older than its last 10 releases)",
        (O.SERVICE, O.GC_FORCE, O.DRY_RUN, D.DOCKER_HOST, D.REGISTRY),
    ),
    Command(
        "cert",
        "TLS certificates the edges serve: add, ls, rm",
        actions=(
            Command(
                "add",
                "validate a certificate chain + key and store it in etcd",
                (O.CERT_NAME, O.CERT_FILE, O.KEY_FILE, O.REPLACE),
            ),
            Command("ls", "certificates: names, issuer, expiry, services using them", (O.JSON,)),
            Command("rm", "remove a certificate", (O.CERT_NAME,)),
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
    Command(
        "releases",
        "an app's releases (v1, v2, ...: code, config, rollback) and failed deploys, with "
        "who, when, result and stage times (the last 50; the newest 10 releases always)",
        D.DEPLOYS,
    ),
    Command("deploys", "the same as releases (its old name)", D.DEPLOYS),
    Command(
        "scale",
        "run N instances of an app's active release now (new ones gated on health, surplus "
        "ones drained first); the app's config keeps N",
        D.SCALE,
    ),
    Command(
        "logs",
        "an app's output, every instance, interleaved by time, prefixed with its release "
        "and instance",
        D.LOGS,
    ),
    Command(
        "run",
        "run a one-off command in a new container of the app's active release (its image, "
        "env, limits and network), then remove it; the exit status is the command's. "
        "E.g. fluster run web -- python manage.py migrate",
        D.RUN,
    ),
    Command(
        "retire",
        "stop the release a push replaced (a push runs this itself, in the background)",
        D.RETIRE,
    ),
    Command("git-shell", "forced command of deploy keys: git push to its apps only", D.GIT_SHELL),
)
GLOBAL: tuple[Option[Any], ...] = (*ETCD_OPTIONS, O.LOG_LEVEL)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluster",
        description="Operate the fluster registry: list services, promote, canary, roll back. "
        "Every global option is also an environment variable (shown in [env ...]).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fluster {__version__}")
    add_options(parser.add_argument_group("etcd"), ETCD_OPTIONS, environ)
    add_options(parser, (O.LOG_LEVEL,), environ)
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
            formatter_class=HelpFormatter,
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
    if command.name == "canary":
        problems.check(
            values[O.WEIGHT] is not None or bool(values[O.STEPS]),
            "--weight is required (or --steps, for an analysed canary)",
        )
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
    setup_logging(values[O.LOG_LEVEL], stream=sys.stderr)
    color = sys.stdout.isatty() and "NO_COLOR" not in environ
    cli = Cli(command.name, values, values[PREFIX], action.name if action else "", color)
    try:
        return run(cli.main(open_store(settings)))
    except KeyboardInterrupt:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
