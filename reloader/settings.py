"""`reloader` settings: flags and environment variables into one typed object."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fluster.settings import (
    Problems,
    add_etcd_options,
    bind_address,
    env_flag,
    etcd_settings,
    non_negative_float,
    option,
    positive_float,
    positive_int,
    prefix_setting,
)
from fluster.store import EtcdSettings
from reloader.model import RenderSettings

DESCRIPTION = """\
Keep HAProxy in step with the fluster registry in etcd.

`reloader run` (the default) starts HAProxy in master-worker mode and supervises it,
watches {prefix}/services/ and applies every change: through HAProxy's runtime API when
only servers changed, by a validated seamless reload otherwise. `reloader render --once`
prints the config for the current etcd state and exits.

HTTP services are routed on --http-bind by Host SERVICE.DOMAIN (or the spec's hosts and
path_prefix), TCP services on their spec port. The state dir holds haproxy.cfg (live),
haproxy.cfg.last-good, haproxy.cfg.rejected(.txt) (the last config HAProxy refused, and
why), master.sock and admin.sock (mode 600), server-state and haproxy.pid.
--status-bind serves /healthz, /metrics (Prometheus), /status (JSON) and / (HTML).

Exit status: 0 after SIGTERM/SIGINT (HAProxy stopped gracefully), 1 when HAProxy cannot
be started or a component failed, 2 for invalid options (all of them listed).
"""


@dataclass(frozen=True, slots=True)
class Settings:
    command: str
    etcd: EtcdSettings
    prefix: str
    render: RenderSettings
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


def _domain(text: object) -> str:
    from fluster.records import validate_host

    return validate_host(str(text), "--domain")


def _directory(text: object) -> Path:
    path = Path(str(text))
    if not path.is_dir():
        raise ValueError(f"no such directory: {text}")
    return path


def parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reloader",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=("run", "render"),
        help="run (default): supervise HAProxy; render: print the config",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="with render: print the config for the current state and exit",
    )
    host = socket.gethostname()
    option(
        p,
        "--state-dir",
        "RELOADER_STATE_DIR",
        environ,
        default="/var/lib/reloader",
        help="directory for haproxy.cfg, sockets, server state and the last good config",
    )
    option(
        p,
        "--http-bind",
        "RELOADER_HTTP_BIND",
        environ,
        default="*:80",
        help="address of the shared HTTP frontend (TCP services bind on its host)",
    )
    option(
        p,
        "--status-bind",
        "RELOADER_STATUS_BIND",
        environ,
        default="127.0.0.1:9090",
        help="address of /healthz, /metrics, /status",
    )
    option(
        p,
        "--stats-bind",
        "RELOADER_STATS_BIND",
        environ,
        help="address of HAProxy's own stats page (off when empty)",
    )
    option(
        p,
        "--domain",
        "RELOADER_DOMAIN",
        environ,
        default="localhost",
        help="services without hosts are routed by Host SERVICE.DOMAIN",
    )
    option(
        p,
        "--templates",
        "RELOADER_TEMPLATES",
        environ,
        help="directory of Jinja2 templates overriding the defaults file by file",
    )
    option(
        p, "--haproxy", "RELOADER_HAPROXY", environ, default="haproxy", help="the haproxy binary"
    )
    option(
        p,
        "--debounce-quiet",
        "RELOADER_DEBOUNCE_QUIET",
        environ,
        default="0.05",
        help="seconds without changes before applying",
    )
    option(
        p,
        "--debounce-max-wait",
        "RELOADER_DEBOUNCE_MAX_WAIT",
        environ,
        default="0.5",
        help="seconds after the first change of a burst by which it is applied",
    )
    option(
        p,
        "--max-removal-pct",
        "RELOADER_MAX_REMOVAL_PCT",
        environ,
        default="50",
        help="hold removals of more than this percent of a service's servers at once",
    )
    option(
        p,
        "--removal-hold",
        "RELOADER_REMOVAL_HOLD",
        environ,
        default="30",
        help="seconds such removals are held",
    )
    p.add_argument(
        "--no-removal-guard",
        action="store_true",
        default=env_flag(environ, "RELOADER_NO_REMOVAL_GUARD"),
        help="apply mass removals at once [env RELOADER_NO_REMOVAL_GUARD]",
    )
    option(
        p,
        "--hard-stop-after",
        "RELOADER_HARD_STOP_AFTER",
        environ,
        default="60",
        help="seconds an old HAProxy worker may finish its requests after a reload",
    )
    option(
        p,
        "--sync-max-age",
        "RELOADER_SYNC_MAX_AGE",
        environ,
        default="60",
        help="/healthz fails when etcd last confirmed our state longer ago (s)",
    )
    option(
        p,
        "--id",
        "RELOADER_ID",
        environ,
        default=host,
        help="name of this reloader under {prefix}/reloaders/",
    )
    option(
        p,
        "--node",
        "RELOADER_NODE",
        environ,
        default=host,
        help="node name published with the applied revision",
    )
    option(p, "--log-level", "RELOADER_LOG_LEVEL", environ, default="info", help="log level")
    add_etcd_options(p, environ)
    return p


def load(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Parse and validate; raises SettingsError listing every problem."""
    env = os.environ if environ is None else environ
    args = parser(env).parse_args(argv)
    pr = Problems()
    etcd = etcd_settings(args, pr)
    prefix = prefix_setting(args, pr)
    http_bind = pr.convert("--http-bind", args.http_bind, bind_address, ("", 80))
    status_bind = pr.convert("--status-bind", args.status_bind, bind_address, ("127.0.0.1", 9090))
    stats_bind = (
        pr.convert("--stats-bind", args.stats_bind, bind_address, None) if args.stats_bind else None
    )
    templates = (
        pr.convert("--templates", args.templates, _directory, None) if args.templates else None
    )
    state_dir = Path(args.state_dir)
    pr.check(args.command == "render" or bool(args.state_dir), "--state-dir is required")
    rid = str(args.id)
    pr.check(bool(rid) and "/" not in rid and len(rid) <= 128, f"--id: bad name {rid!r}")
    settings = Settings(
        command=args.command,
        etcd=etcd,
        prefix=prefix,
        render=RenderSettings(
            state_dir=state_dir.absolute(),
            http_bind=http_bind,
            domain=pr.convert("--domain", args.domain, _domain, "localhost"),
            stats_bind=stats_bind,
            hard_stop_after_s=pr.convert(
                "--hard-stop-after", args.hard_stop_after, positive_int, 60
            ),
        ),
        status_bind=status_bind,
        templates=templates,
        haproxy=str(args.haproxy),
        quiet=pr.convert("--debounce-quiet", args.debounce_quiet, non_negative_float, 0.05),
        max_wait=pr.convert("--debounce-max-wait", args.debounce_max_wait, positive_float, 0.5),
        max_removal_pct=pr.convert("--max-removal-pct", args.max_removal_pct, _percent, 50.0),
        removal_hold=pr.convert("--removal-hold", args.removal_hold, non_negative_float, 30.0),
        guard=not args.no_removal_guard,
        sync_max_age=pr.convert("--sync-max-age", args.sync_max_age, positive_float, 60.0),
        reloader_id=rid,
        node=str(args.node),
        log_level=str(args.log_level),
    )
    pr.raise_if_any()
    return settings
