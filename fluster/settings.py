"""Flags and environment variables into one typed settings object, validated at start.

Every option is both a flag and an environment variable (flag wins). Components declare
their options on an argparse parser with `option()`, which records the variable name in
the help text; `Problems` gathers every bad value so the user sees all of them at once,
and `exit_on_problems` turns them into exit status 2. Only the entry points read
`os.environ`; they pass it in here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from fluster.keys import DEFAULT_PREFIX, normalise_prefix
from fluster.store import EtcdSettings, endpoints_from_text

T = TypeVar("T")
EXIT_USAGE = 2


class SettingsError(Exception):
    """One or more options were invalid; the message lists every one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))
        self.problems = problems


class Problems:
    """Collects conversion errors so that all of them are reported together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def convert(self, name: str, value: Any, fn: Callable[[Any], T], default: T) -> T:
        """`fn(value)`, or `default` with the error recorded under `name`."""
        try:
            return fn(value)
        except (ValueError, TypeError, OSError) as exc:
            self.items.append(f"{name}: {exc}")
            return default

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.items.append(message)

    def raise_if_any(self) -> None:
        if self.items:
            raise SettingsError(self.items)


def option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    env: str | None,
    environ: Mapping[str, str],
    *,
    default: Any = None,
    help: str,
    **kwargs: Any,
) -> None:
    """Add `flag`, defaulting to `$env` when set, and say so in --help."""
    value = environ.get(env, default) if env else default
    suffix = f" [env {env}]" if env else ""
    shown = (
        "" if default in (None, False, "") or "%(default)" in help else " (default: %(default)s)"
    )
    parser.add_argument(flag, default=value, help=help + shown + suffix, **kwargs)


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def positive_float(text: Any) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: Any) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {text}")
    return value


def positive_int(text: Any) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be > 0, got {text}")
    return value


def existing_file(text: Any) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    return path


def bind_address(text: Any) -> tuple[str, int]:
    """`host:port`, `*:port` or `:port` -> (host, port); `*` and empty mean all addresses."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"want HOST:PORT, got {text!r}")
    host = host.strip("[]")
    return ("" if host in ("*", "") else host), int(port)


# -- the etcd options every component shares (names are a contract) --------------------


def add_etcd_options(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    group = parser.add_argument_group("etcd")
    option(
        group,
        "--etcd-endpoints",
        "ETCD_ENDPOINTS",
        environ,
        default="127.0.0.1:2379",
        help="comma-separated host:port or https://host:port of etcd members",
    )
    option(
        group,
        "--etcd-cacert",
        "ETCD_CACERT",
        environ,
        help="CA bundle to verify etcd (enables TLS)",
    )
    option(group, "--etcd-cert", "ETCD_CERT", environ, help="client certificate for etcd")
    option(group, "--etcd-key", "ETCD_KEY", environ, help="client private key for etcd")
    option(group, "--etcd-user", "ETCD_USER", environ, help="etcd user name")
    option(
        group,
        "--etcd-password",
        "ETCD_PASSWORD",
        environ,
        help="etcd password (prefer the environment variable: flags show in ps)",
    )
    option(
        group,
        "--etcd-tls-server-name",
        "ETCD_TLS_SERVER_NAME",
        environ,
        help="name to verify in etcd's certificate (default: the first endpoint's host)",
    )
    option(
        group,
        "--prefix",
        "FLUSTER_PREFIX",
        environ,
        default=DEFAULT_PREFIX,
        help="etcd key prefix of the fluster registry",
    )


def etcd_settings(args: argparse.Namespace, problems: Problems) -> EtcdSettings:
    fallback: tuple[str, ...] = ("127.0.0.1:2379",)
    endpoints = problems.convert(
        "--etcd-endpoints", args.etcd_endpoints, endpoints_from_text, fallback
    )

    def path(name: str, value: str | None) -> Path | None:
        return None if not value else problems.convert(name, value, existing_file, None)

    cert, key = path("--etcd-cert", args.etcd_cert), path("--etcd-key", args.etcd_key)
    problems.check(
        bool(args.etcd_cert) == bool(args.etcd_key), "--etcd-cert and --etcd-key go together"
    )
    problems.check(
        not args.etcd_user or bool(args.etcd_password),
        "--etcd-user needs --etcd-password (or ETCD_PASSWORD)",
    )
    return EtcdSettings(
        endpoints=endpoints,
        cacert=path("--etcd-cacert", args.etcd_cacert),
        cert=cert,
        key=key,
        user=args.etcd_user or None,
        password=args.etcd_password or None,
        tls_server_name=args.etcd_tls_server_name or None,
    )


def prefix_setting(args: argparse.Namespace, problems: Problems) -> str:
    prefix = normalise_prefix(args.prefix)
    problems.check(bool(prefix), "--prefix must not be empty")
    return prefix


def exit_on_problems(error: SettingsError) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
