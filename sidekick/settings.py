"""The sidekick's one settings object, built from flags and `SIDEKICK_*` variables.

Three modes share every option that makes sense for them (DESIGN.md, command-line
contract): companion (`--container`), host agent (`--all`) and static (`--address`).
Every bad value is reported in one message with exit status 2, before anything runs.

`--check` is two things by contract: with a value it chooses the app's health check
(`http:/path`, `tcp`, `docker`, `none`); alone it asks a running sidekick whether its
registrations are current (exit 0 if so), which makes it a Docker HEALTHCHECK.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
    Problems,
    add_etcd_options,
    env_flag,
    etcd_settings,
    non_negative_float,
    option,
    positive_float,
    positive_int,
    prefix_setting,
)
from fluster.store import EtcdSettings
from sidekick.health import CheckSpec, parse_check

T = TypeVar("T")
Mode = Literal["companion", "all", "static"]
STATUS_CHECK = "\0status"  # what a bare `--check` stores: no user value can collide
DEFAULT_DOCKER = "unix:///var/run/docker.sock"


@dataclass(frozen=True, slots=True)
class Settings:
    mode: Mode
    etcd: EtcdSettings
    mode_given: bool = True  # False only for a bare `sidekick --check`
    prefix: str = "/fluster"
    container: str = ""
    service: str = ""
    port: int | None = None
    address: tuple[str, int] | None = None
    instance: str = ""
    node: str = ""
    advertise_ip: str = ""
    internal: bool = False
    network: str = ""
    app_version: str = ""
    weight: int = 100
    tags: Mapping[str, str] = field(default_factory=dict)
    check: CheckSpec | None = None  # None: "auto" (Docker HEALTHCHECK if the image has one)
    check_interval: float = 2.0
    check_timeout: float = 2.0
    rise: int = 2
    fall: int = 3
    ttl: int = 10
    drain_seconds: float = 5.0
    on_retire: Literal["deregister", "stop"] = "deregister"
    docker_host: str = DEFAULT_DOCKER
    state_dir: Path = Path("/run/sidekick")
    log_level: str = "info"

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


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidekick",
        description=(
            "Register containers (or any process) in the fluster registry on etcd, under a "
            "lease kept alive while the app is healthy.\n\n"
            "  companion:  sidekick --container NAME --service web --port 8080\n"
            "  host agent: sidekick --all   (containers labelled fluster.service=NAME, with\n"
            "              fluster.port, fluster.version, fluster.check, fluster.weight,\n"
            "              fluster.tags.KEY labels)\n"
            "  static:     sidekick --service web --address 10.0.0.5:8080\n"
            "  health:     sidekick --check   (exit 0 while the registrations are current)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sidekick {__version__}")
    e = environ
    what = parser.add_argument_group("what to register")
    option(what, "--container", "SIDEKICK_CONTAINER", e, help="companion: container name or id")
    what.add_argument(
        "--all",
        action="store_true",
        default=env_flag(e, "SIDEKICK_ALL"),
        help="host agent: every container labelled fluster.service [env SIDEKICK_ALL]",
    )
    option(what, "--service", "SIDEKICK_SERVICE", e, help="service name (companion, static)")
    option(what, "--port", "SIDEKICK_PORT", e, help="the container's port (companion)")
    option(what, "--address", "SIDEKICK_ADDRESS", e, help="static: HOST:PORT of the process")
    option(
        what,
        "--instance",
        "SIDEKICK_INSTANCE",
        e,
        help="instance name (default: NODE-CONTAINERID12, or NODE-HOST-PORT when static)",
    )
    option(
        what,
        "--node",
        "SIDEKICK_NODE",
        e,
        help="this host's name, recorded in every instance (default: Docker's or hostname)",
    )
    option(
        what,
        "--app-version",
        "SIDEKICK_APP_VERSION",
        e,
        help="version recorded (default: label fluster.version, else the image tag)",
    )
    option(what, "--weight", "SIDEKICK_WEIGHT", e, default="100", help="HAProxy weight 0-256")
    option(
        what,
        "--tag",
        "SIDEKICK_TAGS",
        e,
        action="append",
        help="KEY=VALUE tag, repeatable (env: comma-separated)",
    )

    addr = parser.add_argument_group("address")
    option(
        addr,
        "--advertise-ip",
        "SIDEKICK_ADVERTISE_IP",
        e,
        help="IP others reach this host on (default: the published port's IP, else detected)",
    )
    addr.add_argument(
        "--internal",
        action="store_true",
        default=env_flag(e, "SIDEKICK_INTERNAL"),
        help="register the container's own IP and port, not the published host port "
        "[env SIDEKICK_INTERNAL]",
    )
    option(
        addr,
        "--network",
        "SIDEKICK_NETWORK",
        e,
        help="with --internal: which container network (default: the first)",
    )

    health = parser.add_argument_group("health and lifecycle")
    option(
        health,
        "--check",
        "SIDEKICK_CHECK",
        e,
        nargs="?",
        const=STATUS_CHECK,
        metavar="KIND",
        help="app check: http:/path | tcp | docker | none (default: docker if the image "
        "has a HEALTHCHECK, else none). Alone: exit 0 while registrations are current",
    )
    option(
        health,
        "--check-interval",
        "SIDEKICK_CHECK_INTERVAL",
        e,
        default="2",
        help="seconds between checks",
    )
    option(
        health,
        "--check-timeout",
        "SIDEKICK_CHECK_TIMEOUT",
        e,
        default="2",
        help="seconds before a check fails",
    )
    option(health, "--rise", "SIDEKICK_RISE", e, default="2", help="passes to become healthy")
    option(health, "--fall", "SIDEKICK_FALL", e, default="3", help="failures to become unhealthy")
    option(health, "--ttl", "SIDEKICK_TTL", e, default="10", help="lease TTL in seconds")
    option(
        health,
        "--drain-seconds",
        "SIDEKICK_DRAIN_SECONDS",
        e,
        default="5",
        help="time in state draining before the record goes",
    )
    option(
        health,
        "--on-retire",
        "SIDEKICK_ON_RETIRE",
        e,
        default="deregister",
        choices=("deregister", "stop"),
        help="when a promotion retires this version: deregister, or also stop the container",
    )

    misc = parser.add_argument_group("runtime")
    option(misc, "--docker-host", "DOCKER_HOST", e, default=DEFAULT_DOCKER, help="Docker API")
    option(
        misc,
        "--state-dir",
        "SIDEKICK_STATE_DIR",
        e,
        default=default_state_dir(e),
        help="where the status file for --check lives",
    )
    option(
        misc,
        "--log-level",
        "SIDEKICK_LOG_LEVEL",
        e,
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log level",
    )
    add_etcd_options(parser, e)
    return parser


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
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


def _record(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """Adapt a records validator (raises RecordError) for Problems.convert."""

    def call(value: Any) -> T:
        try:
            return fn(value)
        except RecordError as exc:
            raise ValueError(exc.reason) from None

    return call


def build(argv: Sequence[str] | None, environ: Mapping[str, str]) -> tuple[Settings, bool]:
    """(settings, status_check) from argv and environ; raises SettingsError listing all."""
    args = build_parser(environ).parse_args(argv)
    problems = Problems()
    status_check = args.check == STATUS_CHECK
    check_text = None if status_check else args.check
    modes = [
        m
        for m, on in (("companion", args.container), ("all", args.all), ("static", args.address))
        if on
    ]
    problems.check(
        len(modes) == 1 or (status_check and len(modes) <= 1),
        "choose one of --container, --all or --address",
    )
    mode: Mode = modes[0] if modes else "static"  # type: ignore[assignment]
    needs_service = mode in ("companion", "static") and not status_check
    problems.check(not needs_service or bool(args.service), f"--service is required ({mode})")
    problems.check(
        mode != "companion" or bool(args.port) or status_check,
        "--port is required with --container",
    )
    problems.check(mode != "all" or not args.service, "--service does not go with --all")
    problems.check(
        mode != "all" or not args.instance,
        "--instance does not go with --all (each container gets NODE-CONTAINERID12)",
    )

    conv = problems.convert
    service = (
        conv("--service", args.service, _record(validate_service_name), "") if args.service else ""
    )
    ttl = conv("--ttl", args.ttl, positive_int, 10)
    problems.check(ttl >= 2, "--ttl: must be at least 2 seconds")
    fall = conv("--fall", args.fall, positive_int, 3)
    settings = Settings(
        mode=mode,
        mode_given=bool(modes),
        etcd=etcd_settings(args, problems),
        prefix=prefix_setting(args, problems),
        container=args.container or "",
        service=str(service),
        port=conv("--port", args.port, _record(lambda v: validate_port(int(v))), None)
        if args.port
        else None,
        address=conv("--address", args.address, parse_address, None) if args.address else None,
        instance=str(conv("--instance", args.instance, _record(validate_instance_name), ""))
        if args.instance
        else "",
        node=args.node or "",
        advertise_ip=str(conv("--advertise-ip", args.advertise_ip, _record(validate_host), ""))
        if args.advertise_ip
        else "",
        internal=bool(args.internal),
        network=args.network or "",
        app_version=str(conv("--app-version", args.app_version, _record(validate_version), ""))
        if args.app_version
        else "",
        weight=conv("--weight", args.weight, _weight, 100),
        tags=conv("--tag", args.tag, parse_tags, {}),
        check=conv("--check", check_text, parse_check, None) if check_text else None,
        check_interval=conv("--check-interval", args.check_interval, positive_float, 2.0),
        check_timeout=conv("--check-timeout", args.check_timeout, positive_float, 2.0),
        rise=conv("--rise", args.rise, positive_int, 2),
        fall=fall,
        ttl=ttl,
        drain_seconds=conv("--drain-seconds", args.drain_seconds, non_negative_float, 5.0),
        on_retire=args.on_retire,
        docker_host=args.docker_host,
        state_dir=Path(args.state_dir),
        log_level=args.log_level,
    )
    problems.check(
        settings.on_retire != "stop" or mode != "static",
        "--on-retire stop needs a container (--container or --all)",
    )
    problems.raise_if_any()
    return settings, status_check


def _weight(text: object) -> int:
    value = int(str(text))
    if not 0 <= value <= 256:
        raise ValueError(f"must be 0-256, got {text}")
    return value


__all__ = ["STATUS_CHECK", "Settings", "build", "build_parser"]
