"""What to register for a container (or a static address): pure functions, no I/O.

A `Plan` is the record, its instance name and its health check. Flags win over labels
in companion mode (the operator named this container); labels win in host-agent mode
(each container describes itself, flags are the host's defaults).

Instance names are `{node}-{container id[:12]}`: stable across sidekick restarts, unique
on the host, and they let a host agent recognise its own records at resync.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from fluster.docker import Container
from fluster.records import NODE_RE, VERSION_RE, Instance, RecordError, validate_service_name
from sidekick.health import CheckSpec, parse_check
from sidekick.settings import Settings

LABEL = "fluster."
# A static process's age is the sidekick's: it starts with the process it registers.
STARTED = datetime.now(UTC).isoformat(timespec="seconds")
WILDCARD = ("", "0.0.0.0", "::")


class PlanError(ValueError):
    """The container cannot be registered as configured; the message says why."""


@dataclass(frozen=True, slots=True)
class Plan:
    service: str
    name: str
    instance: Instance
    check: CheckSpec


def container_name(node: str, container_id: str) -> str:
    return f"{node}-{container_id[:12]}"


OWN_NAME = re.compile(r"(?P<node>.+)-(?P<cid>[0-9a-f]{12})")


def own_labels(
    labels: Mapping[str, str], image_labels: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """The container's labels without the `fluster.*` ones its image gave it, and the
    names of those left out.

    Docker shows a container's labels merged with its image's, so a Dockerfile's
    `LABEL fluster.service=...` would claim a service for every container (and every
    build step) run from that image. A `fluster.*` label counts only when it was set on
    the container (docker run -l, compose, the deployer): one whose value is the
    image's is taken as inherited, whoever set it.
    """
    inherited = sorted(
        k for k, v in labels.items() if k.startswith(LABEL) and image_labels.get(k) == v
    )
    return {k: v for k, v in labels.items() if k not in inherited}, inherited


def plan_container(c: Container, s: Settings, node: str, detected_ip: str) -> Plan:
    labels = c.labels
    flags_first = s.mode == "companion"

    def pick(flag: object, label: str) -> str:
        value = labels.get(LABEL + label, "")
        first, second = (flag, value) if flags_first else (value, flag)
        return str(first or second or "")

    service = pick(s.service, "service")
    port_text = pick(s.port, "port") or _only_port(c)
    try:
        validate_service_name(service)
        port = int(port_text)
        check_text = pick(s.check or "", "check")
        check = parse_check(check_text) if check_text else _auto_check(c)
        weight = int(pick(s.weight if s.weight != 100 else "", "weight") or 100)
    except (RecordError, ValueError) as exc:
        raise PlanError(f"container {c.name}: {exc}") from None
    host, host_port = address(c, port, s, detected_ip)
    tags = {
        k[len(LABEL + "tags.") :]: v for k, v in labels.items() if k.startswith(LABEL + "tags.")
    }
    tags = {**tags, **s.tags} if flags_first else {**s.tags, **tags}
    version = pick(s.app_version, "version") or image_version(c.image)
    name = s.instance if flags_first and s.instance else container_name(node, c.id)
    return Plan(
        service,
        name,
        _instance(host, host_port, version, weight, node, tags, c.name, c.started_at),
        check,
    )


def plan_static(s: Settings, node: str) -> Plan:
    assert s.address is not None
    host, port = s.address
    name = s.instance or sanitize(f"{node}-{host}-{port}")
    check = s.check if s.check and s.check.kind != "docker" else CheckSpec("none")
    return Plan(
        s.service,
        name,
        _instance(host, port, s.app_version, s.weight, node, s.tags, name, STARTED),
        check,
    )


def _instance(
    host: str,
    port: int,
    version: str,
    weight: int,
    node: str,
    tags: Mapping[str, str],
    what: str,
    since: str,
) -> Instance:
    try:
        return Instance.from_dict(
            {
                "host": host,
                "port": port,
                "version": version,
                "weight": weight,
                "node": node,
                "tags": dict(tags),
                "since": since,
            }
        )
    except RecordError as exc:
        raise PlanError(f"{what}: {exc}") from None


def address(c: Container, port: int, s: Settings, detected_ip: str) -> tuple[str, int]:
    """Where others reach the container's `port`: published host port, or with
    `--internal` the container's own IP on its network."""
    if s.internal:
        first = next(iter(c.networks.values()), "")
        ip = c.networks.get(s.network, "") if s.network else first
        if not ip:
            raise PlanError(f"container {c.name}: no IP on network {s.network or '(any)'}")
        return ip, port
    if c.network_mode == "host":
        return s.advertise_ip or detected_ip, port
    bindings = c.ports.get(f"{port}/tcp", ())
    if not bindings:
        raise PlanError(
            f"container {c.name}: port {port}/tcp is not published "
            "(docker run -p), or use --internal for the container's own IP"
        )
    v4 = [b for b in bindings if ":" not in b[0]]
    host_ip, host_port = (v4 or list(bindings))[0]
    # A port published on one IP only (-p 127.0.0.1::8080) is reachable on that IP only.
    host = s.advertise_ip or (host_ip if host_ip not in WILDCARD else detected_ip)
    return host, host_port


def _only_port(c: Container) -> str:
    tcp = sorted({spec.split("/")[0] for spec in c.ports if spec.endswith("/tcp")})
    if len(tcp) != 1:
        raise PlanError(f"container {c.name}: set label fluster.port (exposes {tcp or 'none'})")
    return tcp[0]


def _auto_check(c: Container) -> CheckSpec:
    return CheckSpec("docker") if c.health != "none" else CheckSpec("none")


def image_version(image: str) -> str:
    """`registry:5000/web:3f2a9c1` -> `3f2a9c1`; nothing for `latest` or no tag."""
    tag = (
        image.rpartition("/")[2].partition("@")[0].rpartition(":")[2]
        if ":" in image.rpartition("/")[2]
        else ""
    )
    return tag if tag and tag != "latest" and VERSION_RE.fullmatch(tag) else ""


def sanitize(text: str) -> str:
    """A host name (or anything) made safe for node and instance names."""
    clean = re.sub(r"[^A-Za-z0-9_.-]", "-", text).strip("-.") or "node"
    return clean[:100]


def node_name(given: str, docker_name: str = "") -> str:
    node = sanitize(given or docker_name or socket.gethostname())
    if not NODE_RE.fullmatch(node):
        node = "n" + node
    return node


def detect_ip() -> str:
    """The source address of the default route (no packet is sent); loopback without one."""
    for target, family in (("192.0.2.1", socket.AF_INET), ("2001:db8::1", socket.AF_INET6)):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((target, 9))
                ip = ipaddress.ip_address(sock.getsockname()[0])
                if not ip.is_loopback and not ip.is_link_local:
                    return str(ip)
        except OSError:
            continue
    return "127.0.0.1"
