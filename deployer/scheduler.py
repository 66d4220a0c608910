"""Where a version's containers run: the one step that differs between one machine and many.

A `Scheduler` starts N instances of a release, says whether one of them crashed, stops a
version (keeping its containers for a rollback), brings a stopped version back, and
removes what is no longer wanted. `LocalScheduler` does it on the local Docker engine;
a Swarm scheduler (one service per version) implements the same five calls.

Containers carry the labels the sidekick host agent reads (`fluster.service`,
`fluster.version`, `fluster.port`, `fluster.check`), plus `fluster.app` so the deployer
finds its own and never touches anyone else's. Registration is the sidekick's job: a
container here only has to run and publish its port.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from deployer import oneoff
from deployer.engine import Engine
from deployer.records import AppConfig
from fluster.docker import DockerError, NotFound

APP_LABEL = "fluster.app"
DEPLOY_LABEL = "fluster.deploy"  # the deploy that started the container
Drain = Callable[[list[str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Release:
    app: str
    version: str
    image: str
    deploy_id: str = ""
    command: str = ""  # the Procfile's web: line; "" the image's CMD


@dataclass(frozen=True, slots=True)
class Running:
    """One container of an app, as the scheduler sees it."""

    id: str
    name: str
    version: str
    image: str
    state: str  # Docker's: created, running, restarting, exited, ...


class Scheduler(Protocol):
    network: str  # the Docker network a one-off container of the app joins ("" default)

    async def start(self, release: Release, config: AppConfig) -> list[str]:
        """Start `config.replicas` new instances of `release`; returns their ids."""

    async def crashed(self, ids: list[str]) -> tuple[str, list[str]] | None:
        """(id, last log lines) of an instance that exited or restarted, else None."""

    async def resume(self, release: Release, config: AppConfig) -> list[str]:
        """Bring a stopped version back (its old containers, else new ones from its image)."""

    async def stop(self, app: str, version: str) -> int:
        """Stop every instance of `version`, keeping them for a rollback; returns how many."""

    async def remove(self, app: str, keep: Callable[[str], bool]) -> int:
        """Remove every stopped instance of a version `keep` says no to; returns how many."""

    async def remove_ids(self, ids: list[str]) -> None:
        """Remove these instances now (a failed deploy's new containers)."""

    async def remove_deploy(self, app: str, deploy_id: str, keep: Callable[[str], bool]) -> int:
        """Remove what an abandoned deploy started, but for versions `keep` says yes to."""

    async def instances(self, app: str) -> list[Running]: ...

    async def scale(
        self, release: Release, config: AppConfig, count: int, drain: Drain
    ) -> list[str]:
        """Run `count` instances of the (running) release: new ones started (their ids
        returned, for the health gate), surplus ones drained (`drain(ids)`: out of
        rotation at every edge) before they stop and go."""

    async def logs(self, ref: str, lines: int = 20) -> list[str]:
        """The last log lines of one of the ids `start`/`resume` returned."""


class LocalScheduler:
    """Containers on one Docker engine, ports published on `publish_ip`; on `network`
    when given (an edge in a container on that network reaches them by their own IP)."""

    def __init__(
        self,
        engine: Engine,
        *,
        publish_ip: str = "127.0.0.1",
        network: str = "",
        stop_grace: int = 10,
    ):
        self.engine = engine
        self.publish_ip = publish_ip
        self.network = network
        self.stop_grace = stop_grace

    def container_config(self, release: Release, config: AppConfig) -> dict[str, Any]:
        port = f"{config.port}/tcp"
        env = oneoff.environment(release.app, release.version, config)
        return {
            "Image": release.image,
            **({"Cmd": oneoff.shell(release.command)} if release.command else {}),
            "Env": [f"{k}={v}" for k, v in env.items()],
            "ExposedPorts": {port: {}},
            "Labels": {
                APP_LABEL: release.app,
                "fluster.service": config.service,
                "fluster.version": release.version,
                "fluster.port": str(config.port),
                "fluster.check": config.check,
                DEPLOY_LABEL: release.deploy_id,
            },
            "HostConfig": {
                "PortBindings": {port: [{"HostIp": self.publish_ip, "HostPort": ""}]},
                "RestartPolicy": {"Name": "unless-stopped"},
                **oneoff.limits(release.app, config),
                **({"NetworkMode": self.network} if self.network else {}),
            },
        }

    async def _create(self, release: Release, config: AppConfig) -> str:
        name = f"{release.app}-{release.version[:12]}-{secrets.token_hex(3)}"
        cid = await self.engine.create(name, self.container_config(release, config))
        try:
            await self.engine.start(cid)
        except DockerError:
            await self.engine.remove(cid)
            raise
        return cid

    async def start(self, release: Release, config: AppConfig) -> list[str]:
        made = await asyncio.gather(
            *(self._create(release, config) for _ in range(config.replicas)),
            return_exceptions=True,
        )
        ids = [m for m in made if isinstance(m, str)]
        failed = [m for m in made if isinstance(m, BaseException)]
        if failed:
            await self.remove_ids(ids)
            raise failed[0]
        return ids

    async def crashed(self, ids: list[str]) -> tuple[str, list[str]] | None:
        for cid in ids:
            try:
                info = await self.engine.inspect(cid)
            except NotFound:
                return cid, ["(the container is gone)"]
            if info.status in ("exited", "dead") or info.restarts:
                return cid, await self.engine.logs(cid, 20)
        return None

    async def instances(self, app: str) -> list[Running]:
        found = await self.engine.containers({APP_LABEL: app})
        return [
            Running(
                id=c.id,
                name=c.name,
                version=c.labels.get("fluster.version", ""),
                image=c.image,
                state=c.state,
            )
            for c in found
        ]

    async def resume(self, release: Release, config: AppConfig) -> list[str]:
        mine = [r for r in await self.instances(release.app) if r.version == release.version]
        ids = []
        for r in mine[: config.replicas]:
            if r.state != "running":
                await self.engine.start(r.id)
            ids.append(r.id)
        for r in mine[config.replicas :]:
            await self.engine.remove(r.id)
        missing = config.replicas - len(ids)
        if missing > 0:
            if not await self.engine.has_image(release.image):
                await self.engine.pull(release.image, lambda line: None)
            for _ in range(missing):
                ids.append(await self._create(release, config))
        return ids

    async def stop(self, app: str, version: str) -> int:
        running = [
            r for r in await self.instances(app) if r.version == version and r.state == "running"
        ]
        # In parallel: each app drains on SIGTERM for its own grace period.
        await asyncio.gather(*(self.engine.stop(r.id, self.stop_grace) for r in running))
        return len(running)

    async def remove(self, app: str, keep: Callable[[str], bool]) -> int:
        gone = [
            r for r in await self.instances(app) if r.state != "running" and not keep(r.version)
        ]
        await self.remove_ids([r.id for r in gone])
        return len(gone)

    async def remove_ids(self, ids: list[str]) -> None:
        for cid in ids:
            await self.engine.remove(cid)

    async def remove_deploy(self, app: str, deploy_id: str, keep: Callable[[str], bool]) -> int:
        found = await self.engine.containers({APP_LABEL: app, DEPLOY_LABEL: deploy_id})
        gone = [c.id for c in found if not keep(c.labels.get("fluster.version", ""))]
        await self.remove_ids(gone)
        return len(gone)

    async def logs(self, ref: str, lines: int = 20) -> list[str]:
        return await self.engine.logs(ref, lines)

    async def scale(
        self, release: Release, config: AppConfig, count: int, drain: Drain
    ) -> list[str]:
        running = [
            r
            for r in await self.instances(release.app)
            if r.version == release.version and r.state == "running"
        ]
        if count > len(running):
            more = AppConfig.from_dict({**config.to_dict(), "replicas": count - len(running)})
            return await self.start(release, more)
        surplus = [r.id for r in running[count:]]
        if surplus:
            await drain(surplus)
            await asyncio.gather(*(self.engine.stop(i, self.stop_grace) for i in surplus))
            await self.remove_ids(surplus)
        return []
