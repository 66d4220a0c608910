"""The sidekick's one settings object, built from flags and `SIDEKICK_*` variables.

Three modes share every option that makes sense for them (docs/REGISTRY.md, "Commands and
environment"): companion (`--container`), host agent (`--all`) and static (`--address`).
Every bad value is reported in one message with exit status 2, before anything runs.

`--check` is two things by contract: with a value it chooses the app's health check
(`http:/path`, `tcp`, `docker`, `none`); alone it asks a running sidekick whether its
registrations are current (exit 0 if so), which makes it a Docker HEALTHCHECK.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from fluster import __version__
from fluster.records import (
    Instance,
    RecordError,
    validate_host,
    validate_instance_name,
    validate_port,
    validate_service_name,
    validate_version,
)
from fluster.settings import (
    ETCD_OPTIONS,
    MAX_LEASE_TTL,
    HelpFormatter,
    Option,
    Problems,
    add_options,
    etcd_settings,
    integer,
    log_level,
    non_negative_float,
    one_of,
    positive_float,
    positive_int,
    resolve,
    switch,
)
from fluster.settings import PREFIX as PREFIX_OPTION
from fluster.store import EtcdSettings
from sidekick.health import CheckSpec, parse_check

T = TypeVar("T")
Mode = Literal["companion", "all", "static"]
STATUS_CHECK = "\0status"  # what a bare `--check` stores: no user value can collide
DEFAULT_DOCKER = "unix:///var/run/docker.sock"


@dataclass(frozen=True, slots=True)
class Settings:
    """Built only by `build`: every default lives in the option table below."""

    mode: Mode
    etcd: EtcdSettings
    mode_given: bool  # False only for a bare `sidekick --check`
    prefix: str
    container: str
    service: str
    port: int | None
    address: tuple[str, int] | None
    instance: str
    node: str
    advertise_ip: str
    internal: bool
    network: str
    app_version: str
    weight: int
    tags: Mapping[str, str]
    check: CheckSpec | None  # None: "auto" (Docker HEALTHCHECK if the image has one)
    check_interval: float
    check_timeout: float
    rise: int
    fall: int
    ttl: int
    reregister_spread: float | None  # None: TTL/3
    drain_seconds: float
    on_retire: Literal["deregister", "stop"]
    docker_host: str
    state_dir: Path
    log_level: str

    @property
    def status_name(self) -> str:
        """The status file of this sidekick: `--check` finds it from the same flags."""
        if self.mode == "all":
            return "agent.json"
        if self.mode == "companion":
            return "container-" + _safe(self.container) + ".json"
        return "static-" + _safe(self.service) + "-" + _safe(self.instance or "") + ".json"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:100]


def default_state_dir(environ: Mapping[str, str]) -> str:
    if os.geteuid() == 0:
        return "/run/sidekick"
    runtime = environ.get("XDG_RUNTIME_DIR")
    return f"{runtime}/sidekick" if runtime else f"/tmp/sidekick-{os.geteuid()}"


def parse_address(text: Any) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"want HOST:PORT, got {text!r}")
    return validate_host(host.strip("[]"), "--address"), validate_port(int(port), "--address")


def parse_tags(items: Sequence[str] | str | None) -> dict[str, str]:
    texts = [items] if isinstance(items, str) else list(items or [])
    tags: dict[str, str] = {}
    for text in texts:
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"want KEY=VALUE, got {item!r}")
            tags[key] = value
    try:  # the record's own rules, so a tag refused later by the catalog is refused now
        Instance.from_dict({"host": "127.0.0.1", "port": 1, "tags": tags})
    except RecordError as exc:
        raise ValueError(str(exc)) from None
    return tags


DESCRIPTION = """\
Register containers (or any process) in the fluster registry on etcd, under a lease
kept alive while the app is healthy.

  companion:  sidekick --container NAME --service web --port 8080
  host agent: sidekick --all   (containers labelled fluster.service=NAME, with
              fluster.port, fluster.version, fluster.check, fluster.weight,
              fluster.tags.KEY labels)
  static:     sidekick --service web --address 10.0.0.5:8080
  health:     sidekick --check   (exit 0 while the registrations are current)

Every option is also an environment variable (shown in [env ...]); a flag wins.
Exit status: 0 after SIGTERM, 1 when a task that should run forever died, 2 for
invalid options (all of them listed).
"""


def _record(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """Adapt a records validator (raises RecordError) to the table's ValueError."""

    def call(value: Any) -> T:
        try:
            return fn(value)
        except RecordError as exc:
            raise ValueError(exc.reason) from None

    return call


def _check(text: Any) -> CheckSpec | str:
    return STATUS_CHECK if text == STATUS_CHECK else parse_check(text)


def _port(text: Any) -> int:
    return validate_port(integer()(text), "--port")


CONTAINER: Option[str] = Option(
    "--container", "SIDEKICK_CONTAINER", "companion: container name or id", ""
)
ALL = switch("--all", "SIDEKICK_ALL", "host agent: every container labelled fluster.service")
SERVICE: Option[str] = Option(
    "--service",
    "SIDEKICK_SERVICE",
    "service name (companion, static)",
    "",
    _record(validate_service_name),
)
PORT: Option[int | None] = Option(
    "--port", "SIDEKICK_PORT", "the container's port (companion)", None, _record(_port)
)
ADDRESS: Option[tuple[str, int] | None] = Option(
    "--address", "SIDEKICK_ADDRESS", "static: HOST:PORT of the process", None, parse_address
)
INSTANCE: Option[str] = Option(
    "--instance",
    "SIDEKICK_INSTANCE",
    "instance name",
    "",
    _record(validate_instance_name),
    shown="NODE-CONTAINERID12, or NODE-HOST-PORT when static",
)
NODE: Option[str] = Option(
    "--node",
    "SIDEKICK_NODE",
    "this host's name, recorded in every instance",
    "",
    shown="Docker's name for the host, else the host name",
)
APP_VERSION: Option[str] = Option(
    "--app-version",
    "SIDEKICK_APP_VERSION",
    "version recorded",
    "",
    _record(validate_version),
    shown="label fluster.version, else the image tag",
)
WEIGHT: Option[int] = Option(
    "--weight", "SIDEKICK_WEIGHT", "HAProxy weight 0-256", 100, integer(0, 256)
)
TAGS: Option[Mapping[str, str]] = Option(
    "--tag",
    "SIDEKICK_TAGS",
    "KEY=VALUE tag, repeatable (environment: comma-separated)",
    {},
    parse_tags,
    kind="list",
    metavar="KEY=VALUE",
)
WHAT: tuple[Option[Any], ...] = (
    CONTAINER,
    ALL,
    SERVICE,
    PORT,
    ADDRESS,
    INSTANCE,
    NODE,
    APP_VERSION,
    WEIGHT,
    TAGS,
)

ADVERTISE_IP: Option[str] = Option(
    "--advertise-ip",
    "SIDEKICK_ADVERTISE_IP",
    "IP others reach this host on",
    "",
    _record(validate_host),
    shown="the published port's IP, else detected",
)
INTERNAL = switch(
    "--internal",
    "SIDEKICK_INTERNAL",
    "register the container's own IP and port, not the published host port",
)
NETWORK: Option[str] = Option(
    "--network",
    "SIDEKICK_NETWORK",
    "with --internal: which container network",
    "",
    shown="the container's first network",
)
ADDRESSING: tuple[Option[Any], ...] = (ADVERTISE_IP, INTERNAL, NETWORK)

CHECK: Option[CheckSpec | str | None] = Option(
    "--check",
    "SIDEKICK_CHECK",
    "app check: http:/path | tcp | docker | none. Alone: exit 0 while this sidekick's "
    "registrations are current (a Docker HEALTHCHECK)",
    None,
    _check,
    metavar="KIND",
    nargs="?",
    const=STATUS_CHECK,
    shown="docker if the image has a HEALTHCHECK, else none",
)
CHECK_INTERVAL: Option[float] = Option(
    "--check-interval", "SIDEKICK_CHECK_INTERVAL", "seconds between checks", 2.0, positive_float
)
CHECK_TIMEOUT: Option[float] = Option(
    "--check-timeout", "SIDEKICK_CHECK_TIMEOUT", "seconds before a check fails", 2.0, positive_float
)
RISE: Option[int] = Option("--rise", "SIDEKICK_RISE", "passes to become healthy", 2, positive_int)
FALL: Option[int] = Option(
    "--fall", "SIDEKICK_FALL", "failures to become unhealthy", 3, positive_int
)
TTL: Option[int] = Option(
    "--ttl",
    "SIDEKICK_TTL",
    f"lease TTL in seconds, 2-{MAX_LEASE_TTL} (etcd's maximum)",
    10,
    integer(2, MAX_LEASE_TTL),
)
REREGISTER_SPREAD: Option[float | None] = Option(
    "--reregister-spread",
    "SIDEKICK_REREGISTER_SPREAD",
    "after a lost lease, register again within a random delay of up to this many "
    "seconds, so that a fleet whose leases etcd lost at once does not come back in "
    "the same second (0: at once)",
    None,
    non_negative_float,
    shown="TTL/3",
)
DRAIN_SECONDS: Option[float] = Option(
    "--drain-seconds",
    "SIDEKICK_DRAIN_SECONDS",
    "time in state draining before the record goes",
    5.0,
    non_negative_float,
)
ON_RETIRE: Option[str] = Option(
    "--on-retire",
    "SIDEKICK_ON_RETIRE",
    "when a promotion retires this version: deregister, or also stop the container",
    "deregister",
    one_of("deregister", "stop"),
    metavar="{deregister,stop}",
)
LIFECYCLE: tuple[Option[Any], ...] = (
    CHECK,
    CHECK_INTERVAL,
    CHECK_TIMEOUT,
    RISE,
    FALL,
    TTL,
    REREGISTER_SPREAD,
    DRAIN_SECONDS,
    ON_RETIRE,
)

DOCKER_HOST: Option[str] = Option("--docker-host", "DOCKER_HOST", "Docker API", DEFAULT_DOCKER)
STATE_DIR: Option[Path | None] = Option(
    "--state-dir",
    "SIDEKICK_STATE_DIR",
    "where the status file for --check lives",
    None,
    Path,
    shown="/run/sidekick as root, else $XDG_RUNTIME_DIR/sidekick or /tmp/sidekick-UID",
)
LOG_LEVEL = log_level("SIDEKICK_LOG_LEVEL")
RUNTIME: tuple[Option[Any], ...] = (DOCKER_HOST, STATE_DIR, LOG_LEVEL)

OPTIONS: tuple[Option[Any], ...] = (*WHAT, *ADDRESSING, *LIFECYCLE, *RUNTIME, *ETCD_OPTIONS)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidekick",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sidekick {__version__}")
    for title, group in (
        ("what to register", WHAT),
        ("address", ADDRESSING),
        ("health and lifecycle", LIFECYCLE),
        ("runtime", RUNTIME),
        ("etcd", ETCD_OPTIONS),
    ):
        add_options(parser.add_argument_group(title), group, environ)
    return parser


def build(argv: Sequence[str] | None, environ: Mapping[str, str]) -> tuple[Settings, bool]:
    """(settings, status_check) from argv and environ; raises SettingsError listing all."""
    args = build_parser(environ).parse_args(argv)
    problems = Problems()
    v = resolve(args, OPTIONS, problems)
    check = v[CHECK]
    status_check = check == STATUS_CHECK
    modes = [
        m
        for m, on in (
            ("companion", v.given(CONTAINER)),
            ("all", v[ALL]),
            ("static", v.given(ADDRESS)),
        )
        if on
    ]
    problems.check(
        len(modes) == 1 or (status_check and len(modes) <= 1),
        "choose one of --container, --all or --address",
    )
    mode: Mode = modes[0] if modes else "static"  # type: ignore[assignment]
    needs_service = mode in ("companion", "static") and not status_check
    problems.check(not needs_service or v.given(SERVICE), f"--service is required ({mode})")
    problems.check(
        mode != "companion" or v.given(PORT) or status_check,
        "--port is required with --container",
    )
    problems.check(mode != "all" or not v.given(SERVICE), "--service does not go with --all")
    problems.check(
        mode != "all" or not v.given(INSTANCE),
        "--instance does not go with --all (each container gets NODE-CONTAINERID12)",
    )
    spec = check if isinstance(check, CheckSpec) else None
    problems.check(
        not (mode == "static" and spec is not None and spec.kind == "docker"),
        "--check docker needs a container (--container or --all); static mode has "
        "http:/path, tcp or none",
    )
    on_retire = v[ON_RETIRE]
    problems.check(
        on_retire != "stop" or mode != "static",
        "--on-retire stop needs a container (--container or --all)",
    )
    settings = Settings(
        mode=mode,
        mode_given=bool(modes),
        etcd=etcd_settings(v, problems),
        prefix=v[PREFIX_OPTION],
        container=v[CONTAINER],
        service=v[SERVICE],
        port=v[PORT],
        address=v[ADDRESS],
        instance=v[INSTANCE],
        node=v[NODE],
        advertise_ip=v[ADVERTISE_IP],
        internal=v[INTERNAL],
        network=v[NETWORK],
        app_version=v[APP_VERSION],
        weight=v[WEIGHT],
        tags=v[TAGS],
        check=spec,
        check_interval=v[CHECK_INTERVAL],
        check_timeout=v[CHECK_TIMEOUT],
        rise=v[RISE],
        fall=v[FALL],
        ttl=v[TTL],
        reregister_spread=v[REREGISTER_SPREAD],
        drain_seconds=v[DRAIN_SECONDS],
        on_retire="stop" if on_retire == "stop" else "deregister",
        docker_host=v[DOCKER_HOST],
        state_dir=v[STATE_DIR] or Path(default_state_dir(environ)),
        log_level=v[LOG_LEVEL],
    )
    problems.raise_if_any()
    return settings, status_check


__all__ = ["OPTIONS", "STATUS_CHECK", "Settings", "build", "build_parser"]
