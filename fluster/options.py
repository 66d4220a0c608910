"""The options of every `fluster` subcommand, declared once (`fluster/cli.py` lists
them per command, `fluster/commands.py` reads their values)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fluster import ops, release
from fluster.records import (
    BALANCES,
    MAX_HSTS_SECONDS,
    MODES,
    RecordError,
    validate_instance_name,
    validate_service_name,
    validate_version,
)
from fluster.settings import (
    Option,
    integer,
    log_level,
    number,
    one_of,
    switch,
)


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
