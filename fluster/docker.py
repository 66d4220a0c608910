"""The Docker Engine API: the one wrapper the sidekick and the deployer use (the
deployer's `Engine` adds building and moving images through aiodocker,
deployer/engine.py).

What the sidekick needs (inspect, list, events, stop) and the deployer's container
basics travel over fluster/http1.py, not aiohttp: the sidekick runs beside every
container and aiohttp alone would cost it 14 MB. Every failure becomes a `DockerError`
with the engine's own words: `NotFound` (no such container or image),
`DockerUnavailable` (the daemon is down, restarting or its socket missing: retry), or
`DockerError` itself (the engine refused). Results are typed: a container is read into
a frozen `Container` (so planning a registration, sidekick/plan.py, is a pure function
of it), `docker ps` rows into `Listed`, events into `DockerEvent`.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import quote, urlencode, urlsplit

from fluster.http1 import Address, Client
from fluster.text import printable

LOCAL_SOCKET = "/var/run/docker.sock"

# What we follow. `kill` arrives when `docker stop` sends SIGTERM, before the app exits,
# which is the moment to start draining; the others mean it is over (or starting).
EVENTS = frozenset({"start", "die", "stop", "kill", "destroy", "health_status", "pause", "unpause"})


class DockerError(Exception):
    """The engine refused or failed; the message says what and why."""


class DockerUnavailable(DockerError):
    """dockerd cannot be reached (down, restarting, socket missing); try again later."""


class NotFound(DockerError):
    """No such container or image."""


@dataclass(frozen=True, slots=True)
class Container:
    id: str
    name: str
    running: bool
    image: str = ""
    image_id: str = ""  # sha256:..., what the container was created from
    labels: Mapping[str, str] = field(default_factory=dict)
    # "8080/tcp" -> [(host ip, host port), ...]
    ports: Mapping[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    networks: Mapping[str, str] = field(default_factory=dict)  # network name -> IP
    network_mode: str = ""
    health: str = "none"  # none | starting | healthy | unhealthy
    started_at: str = ""  # State.StartedAt to the second, "" if never started
    status: str = ""  # State.Status: created | running | exited | dead | ...
    restarts: int = 0  # RestartCount

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any]) -> Container:
        state = data.get("State") or {}
        config = data.get("Config") or {}
        net = data.get("NetworkSettings") or {}
        ports = {
            spec: tuple(
                (b.get("HostIp", ""), int(b["HostPort"]))
                for b in bindings or ()
                if str(b.get("HostPort", "")).isdigit()
            )
            for spec, bindings in (net.get("Ports") or {}).items()
        }
        networks = {
            name: info.get("IPAddress", "")
            for name, info in (net.get("Networks") or {}).items()
            if info and info.get("IPAddress")
        }
        return cls(
            id=data["Id"],
            name=str(data.get("Name", "")).lstrip("/"),
            # A paused container answers nothing: as good as stopped for a load balancer.
            running=bool(state.get("Running"))
            and not state.get("Restarting")
            and not state.get("Paused"),
            image=config.get("Image", ""),
            image_id=str(data.get("Image") or ""),
            labels=dict(config.get("Labels") or {}),
            ports=ports,
            networks=networks,
            network_mode=(data.get("HostConfig") or {}).get("NetworkMode", ""),
            health=(state.get("Health") or {}).get("Status", "none"),
            started_at=_started(str(state.get("StartedAt") or "")),
            status=str(state.get("Status") or ""),
            restarts=int(data.get("RestartCount") or 0),
        )


@dataclass(frozen=True, slots=True)
class Listed:
    """A container as `docker ps -a` lists it."""

    id: str
    name: str
    image: str
    state: str  # running | exited | created | ...
    labels: Mapping[str, str]

    @classmethod
    def from_list(cls, data: Mapping[str, Any]) -> Listed:
        return cls(
            id=str(data["Id"]),
            name=str((data.get("Names") or ["?"])[0]).lstrip("/"),
            image=str(data.get("Image", "")),
            state=str(data.get("State", "")),
            labels=dict(data.get("Labels") or {}),
        )


def _started(text: str) -> str:
    """Docker's `2026-11-30T18:06:41.123456789Z` (nanoseconds) as `...T18:06:41Z`."""
    if len(text) < 19 or text.startswith("0001-"):  # Docker's zero time: never started
        return ""
    return text[:19] + "Z"


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What a host agent learns about its engine: the node's name and, on a Swarm node,
    the address the node advertises to the swarm (where its host-mode published ports
    are reached from other nodes); empty outside an active swarm."""

    name: str
    swarm_addr: str = ""

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> EngineInfo:
        swarm = info.get("Swarm") or {}
        active = swarm.get("LocalNodeState") == "active"
        return cls(str(info.get("Name", "")), str(swarm.get("NodeAddr") or "") if active else "")


@dataclass(frozen=True, slots=True)
class DockerEvent:
    action: str  # "start", "die", "health_status", ... (health_status without its ": x")
    id: str
    name: str
    labels: Mapping[str, str]
    signal: int | None = None
    status: str = ""  # health_status: "healthy" | "unhealthy" | "starting"


def parse_event(data: Mapping[str, Any]) -> DockerEvent | None:
    """A container event we follow, or None."""
    if data.get("Type") != "container":
        return None
    action, _, status = str(data.get("Action", "")).partition(":")
    if action not in EVENTS:
        return None
    attrs = dict((data.get("Actor") or {}).get("Attributes") or {})
    sig = attrs.pop("signal", None)
    name = attrs.pop("name", "")
    attrs.pop("image", None)
    return DockerEvent(
        action=action,
        id=str((data.get("Actor") or {}).get("ID") or data.get("id", "")),
        name=name,
        labels=attrs,  # the rest of the attributes are the container's labels
        signal=int(sig) if str(sig).isdigit() else None,
        status=status.strip(),
    )


def engine_address(url: str | None = None) -> tuple[Address, str]:
    """Where the engine listens (`url`, else DOCKER_HOST, else the local socket), and the
    Host header to send: `unix:///path`, `tcp://host:port` (TLS as the docker CLI does,
    with DOCKER_TLS_VERIFY and the files in DOCKER_CERT_PATH), `http(s)://host:port`."""
    text = url or os.environ.get("DOCKER_HOST") or f"unix://{LOCAL_SOCKET}"
    parts = urlsplit(text)
    if parts.scheme == "unix":
        return Address(unix=parts.path or LOCAL_SOCKET), "docker"
    if parts.scheme not in ("tcp", "http", "https") or not parts.hostname:
        raise ValueError(f"not a Docker engine address: {text!r}")
    tls = None
    if parts.scheme == "https" or os.environ.get("DOCKER_TLS_VERIFY"):
        certs = os.environ.get("DOCKER_CERT_PATH") or os.path.expanduser("~/.docker")
        tls = ssl.create_default_context(cafile=os.path.join(certs, "ca.pem"))
        tls.load_cert_chain(os.path.join(certs, "cert.pem"), os.path.join(certs, "key.pem"))
    port = parts.port or (2376 if tls else 2375)
    return Address(parts.hostname, port, tls=tls), f"{parts.hostname}:{port}"


class Docker:
    """A lazily connected Docker engine (`url`: None for DOCKER_HOST or the local
    socket); every call raises only DockerError and its kinds."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url
        self._http: Client | None = None
        self._image_labels: dict[str, dict[str, str]] = {}  # image id -> its labels

    @property
    def http(self) -> Client:
        if self._http is None:
            try:
                address, host = engine_address(self.url)
            except (OSError, ValueError) as exc:
                raise DockerUnavailable(f"docker at {self.url}: {exc}") from None
            self._http = Client(address, host=host)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def _path(path: str, params: Mapping[str, Any] | None) -> str:
        query = f"?{urlencode(params)}" if params else ""
        return f"/{path}{query}"

    async def _call(
        self,
        path: str,
        method: str = "GET",
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        what: str | None = None,
    ) -> bytes:
        """One request; the engine's answer (any 2xx or 304), or its refusal raised."""
        what = what or f"docker {path}"
        data = None if body is None else json.dumps(body).encode()
        try:
            response = await self.http.request(method, self._path(path, params), data)
        except (OSError, TimeoutError) as exc:
            raise DockerUnavailable(f"{what}: Docker engine unreachable ({exc!r})") from None
        if response.status < 300 or response.status == 304:
            return response.body
        raise _refusal(what, response.status, response.body)

    async def _json(
        self, path: str, method: str = "GET", params: Mapping[str, Any] | None = None
    ) -> Any:
        raw = await self._call(path, method, params)
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise DockerUnavailable(f"docker {path}: an answer that is not JSON") from None

    async def engine(self) -> EngineInfo:
        return EngineInfo.from_info(await self._json("info"))

    # -- containers ---------------------------------------------------------------------

    async def inspect(self, ref: str) -> Container:
        return Container.from_inspect(await self._json(f"containers/{quote(ref)}/json"))

    async def running(self) -> dict[str, tuple[str, dict[str, str]]]:
        """Every running container on this host (labelled or not): id -> (name, labels)."""
        return {
            c["Id"]: ((c.get("Names") or [""])[0].lstrip("/"), dict(c.get("Labels") or {}))
            for c in await self._json("containers/json")
        }

    async def containers(self, labels: Mapping[str, str]) -> list[Listed]:
        """Every container (running or not) carrying all of `labels`, as `docker ps -a`."""
        filters = json.dumps({"label": [f"{k}={v}" for k, v in labels.items()]})
        found = await self._json("containers/json", params={"all": "1", "filters": filters})
        return [Listed.from_list(c) for c in found]

    async def create(self, name: str, config: Mapping[str, Any]) -> str:
        raw = await self._call(
            "containers/create", "POST", {"name": name}, dict(config), what=f"create {name}"
        )
        return str(json.loads(raw)["Id"])

    async def start(self, ref: str) -> None:
        await self._call(f"containers/{quote(ref)}/start", "POST", what=f"start {ref[:12]}")

    async def stop(self, ref: str, grace: int = 10) -> None:
        await self._call(
            f"containers/{quote(ref)}/stop", "POST", {"t": grace}, what=f"stop {ref[:12]}"
        )

    async def remove(self, ref: str) -> None:
        """Remove the container (and its anonymous volumes), running or not; gone is fine."""
        with contextlib.suppress(NotFound):
            await self._call(
                f"containers/{quote(ref)}",
                "DELETE",
                {"force": "1", "v": "1"},
                what=f"remove {ref[:12]}",
            )

    async def logs(self, ref: str, lines: int = 20) -> list[str]:
        """Its last `lines` lines of output, safe to print."""
        config = (await self._json(f"containers/{quote(ref)}/json") or {}).get("Config") or {}
        raw = await self._call(
            f"containers/{quote(ref)}/logs",
            params={"stdout": "1", "stderr": "1", "tail": str(lines)},
            what=f"logs {ref[:12]}",
        )
        text = (raw if config.get("Tty") else demultiplex(raw)).decode("utf-8", "replace")
        return printable(text, keep_newlines=True).splitlines()[-lines:]

    # -- images -------------------------------------------------------------------------

    async def image(self, ref: str) -> Mapping[str, Any]:
        """`docker image inspect` of `ref`."""
        return dict(await self._json(f"images/{ref}/json"))

    async def image_labels(self, ref: str) -> Mapping[str, str]:
        """The labels an image carries (its Dockerfile's LABEL lines and its bases'); a
        missing one has none. Asked once per image id (ids are immutable; a tag is not)."""
        cached = self._image_labels.get(ref)
        if cached is not None:
            return cached
        try:
            labels = dict((((await self.image(ref)).get("Config")) or {}).get("Labels") or {})
        except NotFound:
            labels = {}
        if ref.startswith("sha256:"):
            if len(self._image_labels) >= 256:
                self._image_labels.pop(next(iter(self._image_labels)))
            self._image_labels[ref] = labels
        return labels

    # -- events -------------------------------------------------------------------------

    async def events(self, since: float | None = None) -> AsyncIterator[DockerEvent]:
        """Container events (from `since`, a Unix time) until the stream breaks, which
        raises DockerUnavailable."""
        params = {"filters": json.dumps({"type": ["container"]})}
        if since is not None:
            params["since"] = f"{since:.3f}"
        try:
            async with self.http.stream("GET", self._path("events", params)) as stream:
                if stream.status != 200:
                    raise _refusal("docker events", stream.status, await stream.read())
                async for line in stream.lines():
                    if line.strip():
                        event = parse_event(json.loads(line))
                        if event is not None:
                            yield event
        except ValueError as exc:  # a line that is not JSON
            raise DockerUnavailable(f"docker events: {exc!r}") from None
        except (OSError, TimeoutError) as exc:
            raise DockerUnavailable(f"docker events: Docker engine unreachable ({exc!r})") from None
        except DockerError as exc:
            if isinstance(exc, DockerUnavailable):
                raise
            raise DockerUnavailable(str(exc)) from None
        raise DockerUnavailable("docker events: stream ended (dockerd restarting?)")


def _refusal(what: str, status: int, body: bytes) -> DockerError:
    """The engine's refusal in its own words (`{"message": ...}`)."""
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body.decode("utf-8", "replace").strip()[:300]
    message = printable(message or f"HTTP {status}")
    if status == 404:
        return NotFound(f"{what}: {message}")
    if status >= 500 and not message:
        return DockerUnavailable(f"{what}: HTTP {status}")
    return DockerError(f"{what}: {message}")


def demultiplex(raw: bytes) -> bytes:
    """The text of a non-TTY container's log stream: frames of an 8-byte header (stream,
    0, 0, 0, big-endian length) and that many bytes."""
    out, at = [], 0
    while at + 8 <= len(raw):
        size = int.from_bytes(raw[at + 4 : at + 8], "big")
        out.append(raw[at + 8 : at + 8 + size])
        at += 8 + size
    return b"".join(out)
