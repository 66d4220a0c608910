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
WEIGHT: Option[int | None] = Option(
    "--weight",
    None,
    "percent of traffic to VERSION, 0-100; 0 ends the canary (or give --steps)",
    None,
    integer(0, 100),
    metavar="PERCENT",
)


def canary_steps(text: Any) -> tuple[int, ...]:
    """`10,50` -> (10, 50): rising percentages below 100; `none` -> () (no analysis)."""
    raw = str(text).strip()
    if raw in ("none", "0"):
        return ()
    try:
        steps = tuple(int(p.strip().rstrip("%")) for p in raw.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"want rising percentages such as 10,50, got {text!r}") from None
    if not steps or any(not 0 < s < 100 for s in steps) or list(steps) != sorted(set(steps)):
        raise ValueError(f"want rising percentages between 1 and 99 such as 10,50, got {text!r}")
    return steps


def duration_seconds(text: Any) -> float:
    """`30s`, `2m` -> seconds (at least 1)."""
    seconds = ops.parse_keep_old(str(text)).total_seconds()
    if seconds < 1:
        raise ValueError(f"want at least 1s, got {text!r}")
    return seconds


def percent(text: Any) -> float:
    """`1%`, `0.5` -> percent."""
    value = float(str(text).strip().rstrip("%"))
    if not 0 <= value <= 100:
        raise ValueError(f"want a percentage between 0 and 100, got {text!r}")
    return value


STEPS: Option[tuple[int, ...]] = Option(
    "--steps",
    None,
    "walk the canary through these shares, each judged by the edges' counters for "
    "--interval, then promote VERSION; one over the bar rolls back (e.g. 10,50)",
    (),
    canary_steps,
    metavar="PCT,PCT",
)
INTERVAL: Option[float] = Option(
    "--interval", None, "how long each step is observed (10s, 1m)", 30.0, duration_seconds,
    shown="30s", metavar="DURATION",
)  # fmt: skip
MAX_ERRORS: Option[float] = Option(
    "--max-errors", None, "the bar: VERSION's 5xx share of its responses in a step (or the "
    "active version's, when higher)", 1.0, percent, shown="1%", metavar="PCT",
)  # fmt: skip
MIN_REQUESTS: Option[int] = Option(
    "--min-requests", None, "responses a step needs to be judged (it waits up to two more "
    "intervals for them, then goes on with a warning)", 20, integer(1, 10**9), metavar="N",
)  # fmt: skip


def latency(text: Any) -> float | None:
    """`250ms`, `0.5s`, `1s` -> seconds; `none` -> None (not judged)."""
    raw = str(text).strip().lower()
    if raw == "none":
        return None
    try:
        value = float(raw[:-2]) / 1000 if raw.endswith("ms") else float(raw.rstrip("s"))
    except ValueError:
        raise ValueError(f"want a duration such as 250ms or 1s, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"want a duration above 0, got {text!r}")
    return value


MAX_LATENCY: Option[float | None] = Option(
    "--max-latency", None, "judge response times too: VERSION's mean response time in a step "
    "(HAProxy's, over each edge's last 1024 responses) may not exceed this, or the active "
    "version's when higher (250ms, 1s)", None, latency, shown="not judged", metavar="DURATION",
)  # fmt: skip
ANALYSIS = (STEPS, INTERVAL, MAX_ERRORS, MIN_REQUESTS, MAX_LATENCY)
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
