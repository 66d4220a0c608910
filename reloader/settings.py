"""`reloader` settings: flags and environment variables into one typed object."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluster.settings import (
    DOMAIN,
    ETCD_OPTIONS,
    PREFIX,
    HelpFormatter,
    Option,
    Problems,
    add_options,
    bind_address,
    etcd_settings,
    log_level,
    non_negative_float,
    positive_float,
    positive_int,
    resolve,
    switch,
)
from fluster.store import EtcdSettings
from reloader.acme import AcmeSettings
from reloader.model import POOL_SIZE, RenderSettings
from reloader.targets import Network, TargetPolicy, etcd_targets, parse_networks

DESCRIPTION = """\
Keep HAProxy in step with the fluster registry in etcd.

`reloader run` (the default) starts HAProxy in master-worker mode and supervises it,
watches {prefix}/services/ and applies every change: through HAProxy's runtime API when
only servers or HTTP routes changed or a new HTTP service fits a pool backend
(--http-pool), by a validated seamless reload otherwise. `reloader render --once`
prints the config for the current etcd state and exits.

HTTP services are routed on --http-bind by Host SERVICE.DOMAIN (or the spec's hosts and
path_prefix), TCP services on their spec port. The state dir holds haproxy.cfg (live),
haproxy.cfg.last-good, haproxy.cfg.rejected(.txt) (the last config HAProxy refused, and
why), master.sock and admin.sock (mode 600), server-state and haproxy.pid.
--status-bind serves /healthz, /metrics (Prometheus), /status (JSON) and / (HTML).

Every option is also an environment variable (shown in [env ...]); a flag wins.
Exit status: 0 after SIGTERM/SIGINT (HAProxy stopped gracefully), 1 when HAProxy cannot
be started or a component failed, 2 for invalid options (all of them listed).
"""


@dataclass(frozen=True, slots=True)
class Settings:
    command: str
    etcd: EtcdSettings
    prefix: str
    render: RenderSettings
    acme: AcmeSettings | None
    status_bind: tuple[str, int]
    templates: Path | None
    haproxy: str
    quiet: float
    max_wait: float
    max_removal_pct: float
    removal_hold: float
    guard: bool
    sync_max_age: float
    reloader_id: str
    node: str
    log_level: str


def _percent(text: object) -> float:
    value = float(str(text))
    if not 0 < value <= 100:
        raise ValueError(f"must be in (0, 100], got {text}")
    return value


def _pool_size(text: object) -> int:
    value = int(str(text))
    if not 0 <= value <= 1000:
        raise ValueError(f"must be from 0 to 1000, got {text}")
    return value


# Printed into haproxy.cfg as `stats auth USER:PASSWORD`: nothing HAProxy would read as
# a separator, a comment or a quote.
STATS_AUTH_RE = re.compile(r"[A-Za-z0-9._-]{1,64}:[^\s#\"'\\]{1,128}")


def _stats_auth(text: object) -> str:
    if STATS_AUTH_RE.fullmatch(str(text)) is None:
        raise ValueError("want USER:PASSWORD (no spaces, quotes, '#' or backslashes)")
    return str(text)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _directory(text: object) -> Path:
    path = Path(str(text))
    if not path.is_dir():
        raise ValueError(f"no such directory: {text}")
    return path


def _https_bind(text: object) -> tuple[tuple[str, int] | None, bool]:
    """(address or None, bind even before a certificate exists)."""
    if text == "auto":
        return ("", 443), False
    if text == "off":
        return None, False
    return bind_address(text), True


def _fraction(text: object) -> float:
    value = float(str(text))
    if not 0 <= value < 1:
        raise ValueError(f"want a fraction in [0, 1), got {text}")
    return value


def _reachable(bind: tuple[str, int]) -> tuple[str, int]:
    """Where HAProxy reaches a listener bound to `bind` (a wildcard: over loopback)."""
    host, port = bind
    wildcard = {"": "127.0.0.1", "*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
    return wildcard.get(host, host), port


def _acme(
    directory: str | None, email: str, ca_file: Path | None, renew_at: float
) -> AcmeSettings | None:
    return AcmeSettings(directory, email, ca_file, renew_at) if directory else None


def _reloader_id(text: object) -> str:
    rid = str(text)
    if not rid or "/" in rid or len(rid) > 128:
        raise ValueError(f"want a name without '/', 1-128 characters, got {rid!r}")
    return rid


COMMAND: Option[str] = Option(
    "command",
    None,
    "run: supervise HAProxy; render: print the config",
    "run",
    kind="positional",
    nargs="?",
    metavar="{run,render}",
)
ONCE = switch("--once", None, "with render: print the config for the current state and exit")
STATE_DIR: Option[Path] = Option(
    "--state-dir",
    "RELOADER_STATE_DIR",
    "directory for haproxy.cfg, sockets, server state and the last good config",
    Path("/var/lib/reloader"),
    Path,
)
HTTP_BIND: Option[tuple[str, int]] = Option(
    "--http-bind",
    "RELOADER_HTTP_BIND",
    "address of the shared HTTP frontend (TCP services bind on its host)",
    ("", 80),
    bind_address,
    shown="*:80",
)
HTTPS_BIND: Option[tuple[tuple[str, int] | None, bool]] = Option(
    "--https-bind",
    "RELOADER_HTTPS_BIND",
    "address of the HTTPS frontend: auto (*:443 once a certificate exists in etcd), an "
    "address (always; the default certificate answers until one exists), or off",
    (("", 443), False),
    _https_bind,
    shown="auto",
)
ACME_DIRECTORY: Option[str | None] = Option(
    "--acme-directory",
    "RELOADER_ACME_DIRECTORY",
    "ACME directory URL: obtain and renew certificates for the hosts of services whose "
    "spec says https on or redirect (off when empty)",
    None,
)
ACME_EMAIL: Option[str] = Option(
    "--acme-email", "RELOADER_ACME_EMAIL", "contact address for the ACME account", ""
)
ACME_CA_FILE: Option[Path | None] = Option(
    "--acme-ca-file",
    "RELOADER_ACME_CA_FILE",
    "CA bundle to trust for the ACME directory's own TLS (a private CA)",
    None,
    Path,
)
ACME_RENEW_AT: Option[float] = Option(
    "--acme-renew-at",
    "RELOADER_ACME_RENEW_AT",
    "renew when this fraction of a certificate's lifetime has passed",
    2 / 3,
    _fraction,
    shown="0.667",
)
STATUS_BIND: Option[tuple[str, int]] = Option(
    "--status-bind",
    "RELOADER_STATUS_BIND",
    "address of /healthz, /metrics, /status and the status page",
    ("127.0.0.1", 9090),
    bind_address,
    shown="127.0.0.1:9090",
)
STATS_BIND: Option[tuple[str, int] | None] = Option(
    "--stats-bind",
    "RELOADER_STATS_BIND",
    "address of HAProxy's own stats page (off when empty)",
    None,
    bind_address,
)
STATS_AUTH: Option[str] = Option(
    "--stats-auth",
    "RELOADER_STATS_AUTH",
    "USER:PASSWORD for the stats page; required when --stats-bind is not on loopback",
    "",
    _stats_auth,
)
TARGET_ALLOW: Option[tuple[Network, ...]] = Option(
    "--target-allow",
    "RELOADER_TARGET_ALLOW",
    "comma-separated CIDRs instances may point at (empty: any address not denied)",
    (),
    parse_networks,
)
TARGET_DENY: Option[tuple[Network, ...]] = Option(
    "--target-deny",
    "RELOADER_TARGET_DENY",
    "comma-separated CIDRs instances may never point at (the edge itself, unspecified "
    "and link-local addresses are always refused)",
    (),
    parse_networks,
)
TEMPLATES: Option[Path | None] = Option(
    "--templates",
    "RELOADER_TEMPLATES",
    "directory of Jinja2 templates overriding the defaults file by file",
    None,
    _directory,
)
HAPROXY: Option[str] = Option("--haproxy", "RELOADER_HAPROXY", "the haproxy binary", "haproxy")
DEBOUNCE_QUIET: Option[float] = Option(
    "--debounce-quiet",
    "RELOADER_DEBOUNCE_QUIET",
    "seconds without changes before applying",
    0.05,
    non_negative_float,
)
DEBOUNCE_MAX_WAIT: Option[float] = Option(
    "--debounce-max-wait",
    "RELOADER_DEBOUNCE_MAX_WAIT",
    "seconds after the first change of a burst by which it is applied",
    0.5,
    positive_float,
)
MAX_REMOVAL_PCT: Option[float] = Option(
    "--max-removal-pct",
    "RELOADER_MAX_REMOVAL_PCT",
    "hold removals that would leave a service more than this percent below the most "
    "instances it had within the hold window",
    50.0,
    _percent,
)
REMOVAL_HOLD: Option[float] = Option(
    "--removal-hold",
    "RELOADER_REMOVAL_HOLD",
    "seconds such removals are held, and the window the most instances are taken over",
    30.0,
    non_negative_float,
)
NO_REMOVAL_GUARD = switch(
    "--no-removal-guard", "RELOADER_NO_REMOVAL_GUARD", "apply mass removals at once"
)
HARD_STOP_AFTER: Option[int] = Option(
    "--hard-stop-after",
    "RELOADER_HARD_STOP_AFTER",
    "seconds an old HAProxy worker may finish its requests after a reload",
    60,
    positive_int,
)
HTTP_POOL: Option[int] = Option(
    "--http-pool",
    "RELOADER_HTTP_POOL",
    "empty HTTP backends kept ready, so a new HTTP service needs no reload "
    "(0: every new service reloads)",
    POOL_SIZE,
    _pool_size,
)
SYNC_MAX_AGE: Option[float] = Option(
    "--sync-max-age",
    "RELOADER_SYNC_MAX_AGE",
    "/healthz fails when etcd last confirmed our state longer ago (seconds)",
    60.0,
    positive_float,
)
ID: Option[str] = Option(
    "--id",
    "RELOADER_ID",
    "name of this reloader under {prefix}/reloaders/",
    socket.gethostname(),
    _reloader_id,
    shown="the host name",
)
NODE: Option[str] = Option(
    "--node",
    "RELOADER_NODE",
    "node name published with the applied revision",
    socket.gethostname(),
    shown="the host name",
)
LOG_LEVEL = log_level("RELOADER_LOG_LEVEL")

OPTIONS: tuple[Option[Any], ...] = (
    COMMAND,
    ONCE,
    STATE_DIR,
    HTTP_BIND,
    HTTPS_BIND,
    ACME_DIRECTORY,
    ACME_EMAIL,
    ACME_CA_FILE,
    ACME_RENEW_AT,
    STATUS_BIND,
    STATS_BIND,
    STATS_AUTH,
    TARGET_ALLOW,
    TARGET_DENY,
    DOMAIN,
    TEMPLATES,
    HAPROXY,
    DEBOUNCE_QUIET,
    DEBOUNCE_MAX_WAIT,
    MAX_REMOVAL_PCT,
    REMOVAL_HOLD,
    NO_REMOVAL_GUARD,
    HARD_STOP_AFTER,
    HTTP_POOL,
    SYNC_MAX_AGE,
    ID,
    NODE,
    LOG_LEVEL,
)


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reloader",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    add_options(p, OPTIONS, environ)
    add_options(p.add_argument_group("etcd"), ETCD_OPTIONS, environ)
    return p


def load(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse and validate; raises SettingsError listing every problem."""
    env = os.environ if environ is None else environ
    args = parser(env).parse_args(argv)
    pr = Problems()
    v = resolve(args, (*OPTIONS, *ETCD_OPTIONS), pr)
    command = v[COMMAND]
    stats_bind = v[STATS_BIND]
    pr.check(
        stats_bind is None or bool(v[STATS_AUTH]) or _loopback(stats_bind[0]),
        "--stats-bind: not on loopback, so --stats-auth (RELOADER_STATS_AUTH) is required",
    )
    etcd = etcd_settings(v, pr)
    pr.check(command in ("run", "render"), f"COMMAND: want run or render, got {command!r}")
    settings = Settings(
        command=command,
        etcd=etcd,
        prefix=v[PREFIX],
        render=RenderSettings(
            state_dir=v[STATE_DIR].absolute(),
            http_bind=v[HTTP_BIND],
            domain=v[DOMAIN],
            stats_bind=stats_bind,
            stats_auth=v[STATS_AUTH],
            status_bind=v[STATUS_BIND],
            targets=TargetPolicy(
                allow=v[TARGET_ALLOW], deny=v[TARGET_DENY], etcd=etcd_targets(etcd.endpoints)
            ),
            https_bind=v[HTTPS_BIND][0],
            https_always=v[HTTPS_BIND][1],
            acme_backend=_reachable(v[STATUS_BIND]) if v[ACME_DIRECTORY] else None,
            hard_stop_after_s=v[HARD_STOP_AFTER],
            pool_size=v[HTTP_POOL],
        ),
        acme=_acme(v[ACME_DIRECTORY], v[ACME_EMAIL], v[ACME_CA_FILE], v[ACME_RENEW_AT]),
        status_bind=v[STATUS_BIND],
        templates=v[TEMPLATES],
        haproxy=v[HAPROXY],
        quiet=v[DEBOUNCE_QUIET],
        max_wait=v[DEBOUNCE_MAX_WAIT],
        max_removal_pct=v[MAX_REMOVAL_PCT],
        removal_hold=v[REMOVAL_HOLD],
        guard=not v[NO_REMOVAL_GUARD],
        sync_max_age=v[SYNC_MAX_AGE],
        reloader_id=v[ID],
        node=v[NODE],
        log_level=v[LOG_LEVEL],
    )
    pr.raise_if_any()
    return settings
