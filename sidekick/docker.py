"""The Docker Engine API, as much of it as a sidekick needs, through aiodocker.

aiodocker errors become two exceptions here: `DockerUnavailable` (the daemon is down or
restarting: retry) and `ContainerGone` (no such container: deregister). Containers are
read into a small frozen `Container`, so planning a registration (`plan.py`) is a pure
function of it. aiodocker is imported lazily: a static sidekick never pays for it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiodocker

# What we follow. `kill` arrives when `docker stop` sends SIGTERM, before the app exits,
# which is the moment to start draining; the others mean it is over (or starting).
EVENTS = frozenset({"start", "die", "stop", "kill", "destroy", "health_status", "pause", "unpause"})


class DockerUnavailable(Exception):
    """dockerd cannot be reached (down, restarting, socket missing); try again later."""


class ContainerGone(Exception):
    """No such container."""


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


class Docker:
    """A lazily connected Docker client; every call raises only our two exceptions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: aiodocker.Docker | None = None
        self._image_labels: dict[str, dict[str, str]] = {}

    async def _docker(self) -> aiodocker.Docker:
        if self._client is None:
            import aiodocker

            try:
                self._client = aiodocker.Docker(url=self.url)
            except (OSError, ValueError, aiodocker.DockerError) as exc:
                raise DockerUnavailable(f"docker at {self.url}: {exc}") from None
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _json(self, path: str, method: str = "GET", params: Any = None) -> Any:
        import aiodocker
        import aiohttp

        docker = await self._docker()
        try:
            return await docker._query_json(path, method, params=params)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise ContainerGone(exc.message) from None
            raise DockerUnavailable(f"docker {path}: {exc.message}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise DockerUnavailable(f"docker {path}: {exc!r}") from None

    async def engine(self) -> EngineInfo:
        return EngineInfo.from_info(await self._json("info"))

    async def inspect(self, ref: str) -> Container:
        return Container.from_inspect(await self._json(f"containers/{ref}/json"))

    async def image_labels(self, image_id: str) -> Mapping[str, str]:
        """The labels an image carries (its Dockerfile's LABEL lines and its bases').
        Images are immutable: each is asked for once; a missing one has none."""
        if image_id not in self._image_labels:
            try:
                data = await self._json(f"images/{image_id}/json")
                labels = dict((data.get("Config") or {}).get("Labels") or {})
            except ContainerGone:
                labels = {}
            if len(self._image_labels) >= 256:
                self._image_labels.pop(next(iter(self._image_labels)))
            self._image_labels[image_id] = labels
        return self._image_labels[image_id]

    async def running(self) -> dict[str, tuple[str, dict[str, str]]]:
        """Every running container on this host (labelled or not): id -> (name, labels)."""
        return {
            c["Id"]: ((c.get("Names") or [""])[0].lstrip("/"), dict(c.get("Labels") or {}))
            for c in await self._json("containers/json")
        }

    async def stop(self, ref: str, grace: int = 10) -> None:
        import aiodocker
        import aiohttp

        docker = await self._docker()
        try:
            # aiodocker's _query hands the response over without releasing it.
            async with docker._query(
                f"containers/{ref}/stop", "POST", params={"t": grace}
            ) as response:
                response.release()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise ContainerGone(exc.message) from None
            raise DockerUnavailable(f"docker stop: {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise DockerUnavailable(f"docker stop: {exc!r}") from None

    async def events(self, since: float | None = None) -> AsyncIterator[DockerEvent]:
        """Container events (from `since`, a Unix time) until the stream breaks, which
        raises DockerUnavailable."""
        import aiodocker
        import aiohttp

        docker = await self._docker()
        params = {"filters": json.dumps({"type": ["container"]})}
        if since is not None:
            params["since"] = f"{since:.3f}"
        try:
            async with docker._query("events", params=params, timeout=None) as response:
                try:
                    while True:
                        line = await response.content.readline()
                        if not line:
                            break
                        event = parse_event(json.loads(line))
                        if event is not None:
                            yield event
                finally:
                    response.close()  # not released by aiodocker; a broken one must not linger
        except aiodocker.DockerError as exc:
            raise DockerUnavailable(f"docker events: {exc.message}") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise DockerUnavailable(f"docker events: {exc!r}") from None
        raise DockerUnavailable("docker events: stream ended (dockerd restarting?)")
