"""Swarm as the deploy scheduler: one Swarm service per version of an app, across nodes.

The same five calls as `LocalScheduler`, so the health gate, promotion and retirement
are the pipeline's own code on one host or many. Here a version is the service
`{app}-{sha7}` (`service_name`) with the app's replicas; Swarm places its tasks on the
nodes and restarts them; the sidekick host agent on each node registers the tasks of its
node from their container labels. So:

- start: create the service from the registry image (every node pulls it), its tasks'
  containers labelled for the sidekick, the port published in host mode on a port
  Docker picks (the edges reach tasks at node address + that port, not through Swarm's
  ingress mesh: docs/DEPLOYING.md);
- stop (retire, after the drain): scale the service to 0; the service stays, so
- resume (rollback): scale it back up (or create it again if it was removed);
- remove (gc, after keep-old): delete the services at 0 replicas.

An "id" in the scheduler's interface is a service name here. Services are found by their
`fluster.app` / `fluster.version` labels, never by name, so a user's own services are
never touched. Talks to a manager node's engine (DOCKER_HOST) through aiodocker's
services API; scaling is a service update with the spec's version, which aiodocker's
`update` does not offer, so that one call goes to the Engine API directly.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from deployer import oneoff
from deployer.engine import DeployError, Engine, mapped
from deployer.records import AppConfig
from deployer.scheduler import APP_LABEL, Drain, Release, Running
from fluster.docker import DockerError, NotFound
from fluster.runtime import Backoff

VERSION_LABEL = "fluster.version"
# Task states of an app that ended by itself (exited, non-zero or not) or never started
# (image not pulled, no node fits); Swarm replaces such a task (restart policy), so one
# seen during the health gate means the version crashes. Not "shutdown" (scaled down,
# removed) nor "orphaned" (its node was lost): neither is the app's doing.
CRASHED = frozenset({"failed", "rejected", "complete"})
# Task states whose container may still be running (or about to): a service scaled to 0
# keeps such tasks for their stop grace period, serving and registered meanwhile.
LIVE = frozenset({"new", "pending", "assigned", "accepted", "preparing", "starting", "running"})
SHA_RE = re.compile(r"[0-9a-f]{7,64}")
NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]+")


def service_name(app: str, version: str) -> str:
    """`{app}-{sha7}` for a git sha; another version (an image tag) whole, made safe."""
    tail = version[:7] if SHA_RE.fullmatch(version) else NAME_BAD.sub("-", version).strip("-.")
    return f"{app}-{tail or 'v'}"[:63]


def service_spec(release: Release, config: AppConfig, *, stop_grace: int) -> dict[str, Any]:
    """The service for one version: pure, so what Swarm is asked for is testable."""
    env = oneoff.environment(release.app, release.version, config)
    ident = {APP_LABEL: release.app, VERSION_LABEL: release.version}
    host = oneoff.limits(release.app, config)
    resources = {
        name: host[key] for name, key in (("MemoryBytes", "Memory"), ("NanoCPUs", "NanoCpus"))
        if key in host
    }  # fmt: skip
    return {
        "Name": service_name(release.app, release.version),
        "Labels": {**ident, "fluster.deploy": release.deploy_id},
        "TaskTemplate": {
            "ContainerSpec": {
                "Image": release.image,
                **({"Command": oneoff.shell(release.command)} if release.command else {}),
                **({"Mounts": oneoff.mounts(release.app, config)} if config.volumes else {}),
                "Env": [f"{k}={v}" for k, v in env.items()],
                # On the containers, where the sidekick reads them (not the service's).
                "Labels": {
                    **ident,
                    "fluster.service": config.service,
                    "fluster.port": str(config.port),
                    "fluster.check": config.check,
                    "fluster.deploy": release.deploy_id,
                },
                "StopGracePeriod": stop_grace * 1_000_000_000,
            },
            "RestartPolicy": {"Condition": "any", "Delay": 2_000_000_000},
            **({"Resources": {"Limits": resources}} if resources else {}),
        },
        "Mode": {"Replicated": {"Replicas": config.replicas}},
        "EndpointSpec": {
            "Mode": "dnsrr",  # no virtual IP: nothing routes through Swarm's balancer
            "Ports": [{"Protocol": "tcp", "TargetPort": config.port, "PublishMode": "host"}],
        },
    }


def replicas_of(service: Mapping[str, Any]) -> int:
    mode = (service.get("Spec") or {}).get("Mode") or {}
    return int((mode.get("Replicated") or {}).get("Replicas", 0))


class SwarmScheduler:
    """Versions as Swarm services, through a manager's engine."""

    network = ""  # one-off containers run on the manager, on its default bridge

    def __init__(self, engine: Engine, *, stop_grace: int = 10) -> None:
        self.engine = engine
        self.stop_grace = stop_grace
        self._old_tasks: dict[str, set[str]] = {}
        self._reused: set[str] = set()  # services `start` found already there

    async def _services(self, app: str, version: str | None = None) -> list[dict[str, Any]]:
        labels = [f"{APP_LABEL}={app}"] + ([f"{VERSION_LABEL}={version}"] if version else [])
        async with mapped("list services (is this engine a swarm manager?)"):
            found = await self.engine.client.services.list(filters={"label": labels})
        return [dict(s) for s in found]

    async def _create(self, release: Release, config: AppConfig) -> str:
        spec = service_spec(release, config, stop_grace=self.stop_grace)
        async with mapped(f"create service {spec['Name']}"):
            await self.engine.client._query_json(
                "services/create", method="POST", data=json.dumps(spec)
            )
        return str(spec["Name"])

    async def _scale(self, name: str, replicas: int) -> None:
        """Set the replicas; retried once when another writer bumped the spec's version."""
        for attempt in (1, 2):
            async with mapped(f"service {name}"):
                service = await self.engine.client.services.inspect(name)
            spec = dict(service["Spec"])
            spec["Mode"] = {"Replicated": {"Replicas": replicas}}
            try:
                async with mapped(f"scale {name} to {replicas}"):
                    await self.engine.client._query_json(
                        f"services/{service['ID']}/update",
                        method="POST",
                        params={"version": str(service["Version"]["Index"])},
                        data=json.dumps(spec),
                    )
                return
            except DockerError as exc:
                if attempt == 2 or "out of sequence" not in str(exc):
                    raise

    async def start(self, release: Release, config: AppConfig) -> list[str]:
        if await self._services(release.app, release.version):
            # A version deployed before (--no-promote, or an older version deployed
            # again): scale its service up rather than fail on the name.
            names = await self.resume(release, config)
            self._reused.update(names)
            return names
        return [await self._create(release, config)]

    async def _tasks(self, name: str) -> list[dict[str, Any]]:
        async with mapped(f"tasks of {name}"):
            return [dict(t) for t in await self.engine.client.tasks.list(filters={"service": name})]

    async def _remember(self, name: str) -> None:
        """The tasks a service has now: their past (a crash before the service was
        scaled to 0, say) is not the new replicas' crash."""
        self._old_tasks[name] = {str(t["ID"]) for t in await self._tasks(name)}

    async def crashed(self, ids: list[str]) -> tuple[str, list[str]] | None:
        for name in ids:
            old = self._old_tasks.get(name, set())
            for task in await self._tasks(name):
                status = task.get("Status") or {}
                if task["ID"] in old or status.get("State") not in CRASHED:
                    continue
                why = status.get("Err") or status.get("Message") or status.get("State")
                return name, [f"task {str(task['ID'])[:12]}: {why}", *await self.logs(name)]
        return None

    async def logs(self, ref: str, lines: int = 20) -> list[str]:
        """The service's last log lines, from every node (the manager collects them)."""
        try:
            async with mapped(f"logs of {ref}"):
                pieces = await self.engine.client.services.logs(  # type: ignore[misc]
                    ref, stdout=True, stderr=True, tail=str(lines)
                )
        except DockerError as exc:
            return [f"(no logs: {exc})"]
        return "".join(pieces).splitlines()[-lines:]

    async def resume(self, release: Release, config: AppConfig) -> list[str]:
        found = await self._services(release.app, release.version)
        if not found:
            return [await self._create(release, config)]
        name = str(found[0]["Spec"]["Name"])
        if not replicas_of(found[0]):
            # Tasks of the last scale-down may still be draining: their containers are up
            # and registered, and the health gate would count them as the new replicas.
            await self._wait_stopped(name)
        await self._remember(name)
        await self._scale(name, config.replicas)
        return [name]

    async def _wait_stopped(self, name: str) -> None:
        """Until no task of `name` can still be running (scaling to 0 returns at once;
        the containers stop over their grace period)."""
        limit = self.stop_grace + 30
        deadline = time.monotonic() + limit
        backoff = Backoff(base=0.1, cap=1.0)  # Docker has no events for tasks: polled
        while True:
            live = [
                t for t in await self._tasks(name) if (t.get("Status") or {}).get("State") in LIVE
            ]
            if not live:
                return
            if time.monotonic() > deadline:
                raise DeployError(
                    f"{len(live)} task(s) of {name} still running {limit}s after it was scaled to 0"
                )
            await backoff.sleep()

    async def stop(self, app: str, version: str) -> int:
        count = 0
        for service in await self._services(app, version):
            replicas = replicas_of(service)
            if replicas:
                name = str(service["Spec"]["Name"])
                await self._scale(name, 0)
                await self._wait_stopped(name)  # "stopped" means stopped, as on one host
                count += replicas
        return count

    async def remove(self, app: str, keep: Callable[[str], bool]) -> int:
        gone = [
            str(s["Spec"]["Name"])
            for s in await self._services(app)
            if not replicas_of(s) and not keep(str(s["Spec"]["Labels"].get(VERSION_LABEL, "")))
        ]
        await self.remove_ids(gone)
        return len(gone)

    async def remove_deploy(self, app: str, deploy_id: str, keep: Callable[[str], bool]) -> int:
        """Delete the services an abandoned deploy created, but for routed versions."""
        gone = [
            str(s["Spec"]["Name"])
            for s in await self._services(app)
            if s["Spec"]["Labels"].get("fluster.deploy") == deploy_id
            and not keep(str(s["Spec"]["Labels"].get(VERSION_LABEL, "")))
        ]
        await self.remove_ids(gone)
        return len(gone)

    async def remove_ids(self, ids: list[str]) -> None:
        """Delete these services; one `start` reused goes back to 0 replicas instead, so
        a failed deploy of an older version does not take away its rollback."""
        for name in ids:
            if name in self._reused:
                await self._scale(name, 0)
                continue
            try:
                async with mapped(f"remove service {name}"):
                    await self.engine.client.services.delete(name)
            except NotFound:
                pass

    async def scale(
        self, release: Release, config: AppConfig, count: int, drain: Drain
    ) -> list[str]:
        """Swarm picks the tasks a scale-down stops, so none can be drained first: their
        sidekicks drain them as their containers get SIGTERM (docs/DEPLOYING.md)."""
        found = await self._services(release.app, release.version)
        if not found:
            raise DeployError(f"no service of {release.version} to scale")
        name = str(found[0]["Spec"]["Name"])
        more = count > replicas_of(found[0])
        if more:
            await self._remember(name)
        await self._scale(name, count)
        return [name] if more else []

    async def instances(self, app: str) -> list[Running]:
        """One entry per replica a version's service asks for, `running`, all with the
        service's name as id (what `crashed`, `logs` and `remove_ids` take); a service
        at 0 replicas is one `exited` entry, so a stopped version is still seen."""
        out = []
        for s in await self._services(app):
            spec = s["Spec"]
            entry = Running(
                id=str(spec["Name"]),
                name=str(spec["Name"]),
                version=str(spec["Labels"].get(VERSION_LABEL, "")),
                image=str(spec["TaskTemplate"]["ContainerSpec"].get("Image", "")),
                state="running",
            )
            replicas = replicas_of(s)
            out += [entry] * replicas if replicas else [replace(entry, state="exited")]
        return out
