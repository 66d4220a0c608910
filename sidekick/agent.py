"""The three modes on one core: which apps to register, and when, from Docker or flags.

`Sidekick` owns the registrations of one process. Static mode adds one at start. The
Docker modes follow the event stream: list running containers, then follow events
from just before the listing (`since`), so nothing falls in the gap; when the stream
breaks (dockerd restarting) they reconnect with backoff and resync, which deregisters
containers that vanished meanwhile. A host agent also removes records of its node
that name containers no longer running (left by an earlier run): no zombies.
Registrations stay as they are while dockerd is down: the apps may well be running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from signal import SIGINT, SIGKILL, SIGQUIT, SIGTERM
from typing import Any, Literal

import structlog

from fluster.docker import Container, Docker, DockerError, DockerEvent, NotFound
from fluster.keys import instance_key, owner_key, parse_key, services_prefix
from fluster.records import Instance, RecordError
from fluster.runtime import Backoff, Supervisor
from fluster.store import AuthError, Store, StoreError, retry_backoff
from sidekick.health import HealthGate, Probe, docker_healthy, make_probe, watch_health
from sidekick.hub import Hub
from sidekick.plan import (
    LABEL,
    OWN_NAME,
    Plan,
    PlanError,
    node_name,
    own_labels,
    plan_container,
    plan_static,
)
from sidekick.registration import Registration
from sidekick.settings import Settings

log = structlog.get_logger("sidekick")

# Signals a `kill` event stops the app with (None: Docker sent no signal attribute).
# `docker kill -s HUP` or USR1 is a reload or a log rotation, not a stop.
STOP_SIGNALS = frozenset({None, SIGINT, SIGQUIT, SIGKILL, SIGTERM})

LABEL_SERVICE = LABEL + "service"
APP_LABEL = LABEL + "app"  # set by the deployer on the containers it starts
OWNER_CACHE_S = 10.0  # how long a service's owner is taken as read

# What a container event asks of us: follow it, drain it, drop it (nothing left to
# drain), or take its Docker health status.
Response = Literal["track", "drain", "drop", "health"]


def response_to(event: DockerEvent) -> Response | None:
    """What to do about `event` for a container we follow; None: nothing."""
    if event.action in ("start", "unpause"):
        return "track"
    if event.action == "kill":
        return "drain" if event.signal in STOP_SIGNALS else None
    if event.action in ("die", "stop", "destroy", "pause"):
        return "drop"
    if event.action == "health_status":
        return "health"
    return None


@dataclass
class Tracked:
    plan: Plan
    reg: Registration
    health: asyncio.Task[None] | None = None


class Owners:
    """Which app owns a service (`{prefix}/owners/{service}`), each answer taken as read
    for OWNER_CACHE_S."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store, self.prefix = store, prefix
        self._cache: dict[str, tuple[str, float]] = {}  # service -> (its app, valid until)

    async def of(self, service: str) -> str | None:
        """The owning app, "" for none; None when etcd cannot say (the caller fails open)."""
        cached = self._cache.get(service)
        if cached is None or cached[1] < time.monotonic():
            try:
                _, kv = await self.store.get(owner_key(self.prefix, service))
            except StoreError as exc:
                log.warning("cannot read the owner of a service", service=service, error=str(exc))
                return None
            owner = kv.value.decode(errors="replace") if kv is not None else ""
            cached = self._cache[service] = (owner, time.monotonic() + OWNER_CACHE_S)
        return cached[0]


class Sidekick:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        docker: Docker | None,
        node: str,
        detected_ip: str,
        supervisor: Supervisor,
    ) -> None:
        self.s, self.store, self.docker = settings, store, docker
        self.node, self.detected_ip = node, detected_ip
        self.supervisor = supervisor  # every task of ours: one that dies stops the process
        self.hub = Hub(store, settings.prefix, supervisor)
        self.tracked: dict[str, Tracked] = {}  # container id (or "static") -> registration
        self.leaving: dict[str, Registration] = {}  # draining after a stop
        self._deregistering: set[asyncio.Task[Any]] = set()  # waited for at shutdown
        self.reported: dict[str, set[str]] = {}  # container id -> refusals logged
        self.owners = Owners(self.store, settings.prefix)

    def registrations(self) -> list[Registration]:
        return [t.reg for t in self.tracked.values()] + list(self.leaving.values())

    # -- adding and removing ------------------------------------------------------------

    def add(self, key: str, plan: Plan, probe: Probe | None) -> None:
        reg = Registration(
            self.store,
            instance_key(self.s.prefix, plan.service, plan.name),
            plan.instance,
            service=plan.service,
            name=plan.name,
            ttl=self.s.ttl,
            reregister_spread=self.s.reregister_spread,
            drain_seconds=self.s.drain_seconds,
            healthy=probe is None and plan.check.kind != "docker",
        )
        tracked = Tracked(plan, reg)
        if probe is not None:
            gate = HealthGate(self.s.rise, self.s.fall)
            tracked.health = self.supervisor.start(
                f"health {plan.name}",
                watch_health(probe, gate, self.s.check_interval, reg.set_healthy),
            )
        if self.s.on_retire == "stop" and self.docker is not None and key != "static":
            reg.on_retired = lambda: self._stop_container(key, reg)
        self.tracked[key] = tracked
        self.hub.add(reg)
        reg.start(self.supervisor)
        log.info(
            "tracking",
            service=plan.service,
            instance=plan.name,
            address=plan.instance.address,
            check=str(plan.check),
        )

    def leave(self, key: str, *, died: bool) -> None:
        """Stop tracking `key`: drain (cut short if the container died) and deregister."""
        if key in self.leaving:
            if died:
                self.leaving[key].container_died()
            return
        tracked = self.tracked.pop(key, None)
        if tracked is None:
            return
        if tracked.health is not None:
            tracked.health.cancel()
        self.leaving[key] = tracked.reg
        if died:
            tracked.reg.container_died()
        task = self.supervisor.spawn(f"deregister {key}", self._close(key, tracked.reg))
        self._deregistering.add(task)
        task.add_done_callback(self._deregistering.discard)

    async def _close(self, key: str, reg: Registration) -> None:
        try:
            await reg.close()
        finally:
            await self.hub.remove(reg)
            if self.leaving.get(key) is reg:
                del self.leaving[key]

    def _stop_container(self, key: str, reg: Registration) -> None:
        docker = self.docker
        assert docker is not None

        async def stop() -> None:
            reg.log.info("stopping retired container", container=key[:12])
            with contextlib.suppress(DockerError):
                await docker.stop(key)

        self.supervisor.spawn(f"stop {key}", stop())

    async def shutdown(self) -> None:
        """SIGTERM: drain and deregister everything, in parallel, bounded; the
        supervisor cancels what is left afterwards."""
        for key in list(self.tracked):
            self.leave(key, died=False)
        if self._deregistering:
            await asyncio.wait(self._deregistering, timeout=self.s.drain_seconds + 10)
        for reg in self.registrations():
            await reg.cancel()
        await self.hub.close()

    # -- static -------------------------------------------------------------------------

    def start_static(self) -> None:
        plan = plan_static(self.s, self.node)
        host, port = plan.instance.host, plan.instance.port
        self.add("static", plan, make_probe(plan.check, host, port, self.s.check_timeout))

    # -- Docker -------------------------------------------------------------------------

    def _selected(self, cid: str, name: str, labels: dict[str, str] | Any) -> bool:
        if self.s.mode == "all":
            return LABEL_SERVICE in labels
        ref = self.s.container
        return cid.startswith(ref) or name.lstrip("/") == ref.lstrip("/")

    async def _track_container(self, cid: str) -> None:
        assert self.docker is not None
        try:
            container = await self.docker.inspect(cid)
        except NotFound:
            self.leave(cid, died=True)
            return
        if not container.running:
            return
        container = await self._own_labels(container)
        if self.s.mode == "all" and not (
            LABEL_SERVICE in container.labels and await self._may_claim(container)
        ):
            return
        try:
            plan = plan_container(container, self.s, self.node, self.detected_ip)
        except PlanError as exc:
            log.error("cannot register container", container=container.name, error=str(exc))
            return
        current = self.tracked.get(container.id)
        if current is not None and current.plan == plan:
            if plan.check.kind == "docker":  # events may have been missed (resync)
                current.reg.set_healthy(docker_healthy(container.health))
            return
        if current is not None:
            # Its address or record changed (a restart by dockerd): the new record takes
            # the same key, so the old one must not drain. A draining write of the old
            # registration could land after the new put (they travel on separate
            # connections) and leave the new record draining; its lease is revoked
            # instead, which takes the key only while it is still the old one's.
            same_key = current.plan.name == plan.name and current.plan.service == plan.service
            self.leave(container.id, died=same_key)
        probe = make_probe(plan.check, plan.instance.host, plan.instance.port, self.s.check_timeout)
        self.add(container.id, plan, probe)
        if plan.check.kind == "docker":
            self.tracked[container.id].reg.set_healthy(docker_healthy(container.health))

    def _first_report(self, cid: str, what: str) -> bool:
        """True once per container and kind of refusal: a log line, not a log flood."""
        seen = self.reported.setdefault(cid, set())
        first = what not in seen
        seen.add(what)
        return first

    async def _own_labels(self, container: Container) -> Container:
        """`container` with only the `fluster.*` labels set on it, not its image's."""
        assert self.docker is not None
        image = await self.docker.image_labels(container.image_id)  # {} when gone
        labels, inherited = own_labels(container.labels, image)
        if inherited and self._first_report(container.id, "image labels"):
            log.error(
                "ignoring fluster labels that come from the image, not the container",
                container=container.name,
                image=container.image,
                labels=",".join(inherited),
                fix="set them on the container (docker run -l, compose labels:), "
                "never with LABEL in a Dockerfile",
            )
        return dataclasses.replace(container, labels=labels)

    async def _may_claim(self, container: Container) -> bool:
        """Whether the container may register in the service its label names: yes
        unless the service belongs to an app (`fluster app create`) and the container
        is not labelled as that app's. Fails open when etcd cannot say (an identity
        without read access to `owners/`, etcd unreachable): registering needs etcd
        anyway, and the deployer's own containers must not wait for this."""
        service = container.labels[LABEL_SERVICE]
        app = container.labels.get(APP_LABEL, "")
        owner = await self.owners.of(service)
        if not owner or owner == app:
            return True
        if self._first_report(container.id, f"owner {owner}"):
            log.error(
                "refusing a container that claims another app's service",
                container=container.name,
                service=service,
                owner=owner,
                app=app or "(no fluster.app label)",
            )
        return False

    async def resync(self) -> None:
        assert self.docker is not None
        running = await self.docker.running()
        for cid, (name, labels) in running.items():
            if self._selected(cid, name, labels):
                await self._track_container(cid)
        for cid in list(self.tracked):
            if cid not in running:
                log.info("container gone while we were not looking", container=cid[:12])
                self.leave(cid, died=True)
        if self.s.mode == "all":
            self.supervisor.spawn("remove zombies", self.remove_zombies(set(running)))

    async def remove_zombies(self, running: set[str]) -> None:
        """Delete records of this node naming containers that no longer run."""
        ours = {r.key for r in self.registrations()}
        backoff = retry_backoff()
        while True:
            try:
                _, kvs = await self.store.get_prefix(services_prefix(self.s.prefix))
                for kv in kvs:
                    parsed = parse_key(self.s.prefix, kv.key)
                    match = OWN_NAME.fullmatch(parsed.instance) if parsed else None
                    if not match or match["node"] != self.node or kv.key in ours:
                        continue
                    if any(cid.startswith(match["cid"]) for cid in running):
                        continue
                    with contextlib.suppress(RecordError):
                        if Instance.parse(kv.value).node != self.node:
                            continue
                    log.info("removing record of a vanished container", key=kv.key)
                    await self.store.delete(kv.key)
                return
            except AuthError as exc:
                # A per-service identity may not list every service: then leftovers only
                # go when their leases expire (one TTL), which is the guarantee anyway.
                log.error("cannot clean up records of vanished containers", error=str(exc))
                return
            except StoreError as exc:
                log.warning(
                    "zombie cleanup failed, retrying", error=str(exc), attempt=backoff.attempt + 1
                )
                await backoff.sleep()

    async def on_event(self, event: DockerEvent) -> None:
        if event.action == "destroy":
            self.reported.pop(event.id, None)
        if not (
            event.id in self.tracked
            or event.id in self.leaving
            or self._selected(event.id, event.name, event.labels)
        ):
            return
        response = response_to(event)
        if response == "track":
            await self._track_container(event.id)
        elif response in ("drain", "drop"):
            self.leave(event.id, died=response == "drop")
        elif response == "health" and event.id in self.tracked:
            tracked = self.tracked[event.id]
            if tracked.plan.check.kind == "docker":
                tracked.reg.set_healthy(docker_healthy(event.status))

    async def _learn_engine(self) -> None:
        """The node name (unless --node gave one) and, on a Swarm node, its advertise
        address as the default for published ports: the address every other node (and
        edge) reaches this one at, where the IP of the default route may not be, and
        where a sidekick running as a Swarm task would otherwise see its own container's
        address. --advertise-ip wins. Read again at each reconnect: a node may join a
        swarm while the sidekick runs."""
        assert self.docker is not None
        engine = await self.docker.engine()
        if not self.node:
            self.node = node_name("", engine.name)
            log.info("node name from Docker", node=self.node)
        if engine.swarm_addr and not self.s.advertise_ip and engine.swarm_addr != self.detected_ip:
            self.detected_ip = engine.swarm_addr
            log.info("advertising the swarm node address", ip=engine.swarm_addr)

    async def follow_docker(self) -> None:
        """Resync, then follow events; again after every break. Runs forever."""
        assert self.docker is not None
        backoff = Backoff(base=0.2, cap=2.0)
        while True:
            try:
                await self._learn_engine()
                since = time.time() - 1.0
                await self.resync()
                async for event in self.docker.events(since=since):
                    backoff.reset()
                    await self.on_event(event)
            except DockerError as exc:
                log.warning(
                    "docker unreachable, retrying", error=str(exc), attempt=backoff.attempt + 1
                )
                await self.docker.close()
                await backoff.sleep()
