"""A deploy, stage by stage: receive -> build -> push -> start -> healthy -> promote -> retire.

Each stage is printed as it starts and ends (on the terminal of `fluster deploy`, and as
`remote:` lines of `git push`, whose hook runs this) and recorded with its times in the
deploy's record. The order is what keeps users safe:

- nothing that runs is touched before the new version is built, pushed and healthy: a
  build that fails or an app that never passes its check leaves the old version serving,
  removes the new containers and exits non-zero with the build output or the app's log;
- promotion is `fluster.ops.promote` (what `fluster promote` runs), and it waits until
  every reloader has applied it, so no edge still sends traffic to the old version when
  its containers stop;
- the old containers are stopped, not removed: `fluster rollback APP` starts them again
  without a build until the keep-old window ends.

Registration is not done here: the sidekick host agent on the machine registers the
containers from their labels, and the health gate waits for those records in etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from deployer import apps, pushes, source
from deployer.engine import DeployError, Engine
from deployer.gate import HealthGate, short
from deployer.images import Images
from deployer.lock import deploy_lock
from deployer.records import AppConfig, DeployRecord, Stage
from deployer.scheduler import Release, Scheduler
from fluster import ops, release
from fluster.docker import DockerError
from fluster.records import RecordError
from fluster.store import Store, StoreError
from fluster.text import printable

# Stages that change nothing users see: a push cut off during them stops the deploy.
# From the promotion on, it finishes: half a promotion is worse than a whole one.
BEFORE_PROMOTION = frozenset({"build", "tag", "push", "start", "healthy", "canary"})


@dataclass(frozen=True, slots=True)
class Settings:
    registry: str = "127.0.0.1:5000"
    lock_timeout: float = 600.0
    wait_timeout: float = ops.WAIT_TIMEOUT_S  # for every reloader to apply the promotion
    by: str = ""  # who deploys, for the record
    build_timeout: float = 900.0
    max_context: int = 1 << 30  # bytes of build context (the pushed tree)
    build_network: str = "none"  # the RUN steps': no route anywhere, etcd included
    base_images: tuple[str, ...] = ()  # patterns a FROM may match; () any but other apps'


@dataclass(frozen=True, slots=True)
class Source:
    """What to deploy: a git repository and ref, or an image already built."""

    git_dir: Path | None = None
    ref: str = ""
    image: str = ""
    update: source.Update | None = None  # a push: the branch must still be where it was


class DeployFailed(Exception):
    """The deploy stopped; the old version still serves. The message says why."""


class Deployer:
    def __init__(
        self,
        store: Store,
        prefix: str,
        engine: Engine,
        scheduler: Scheduler,
        settings: Settings,
        say: Callable[[str], None],
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        gone: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store, self.prefix = store, prefix
        self.engine, self.scheduler = engine, scheduler
        self.settings = settings
        self.say = say
        self.now = now
        self.gone = gone  # whoever started the deploy stopped watching (a push cut off)
        self.record: DeployRecord | None = None
        self.held: Callable[[], bool] = lambda: True  # the deploy lock is still ours
        self.images = Images(engine, settings, self.head, self.detail)
        self.gate = HealthGate(store, prefix, scheduler, self.detail, gone)

    # -- output and the record --------------------------------------------------------

    def _stamp(self) -> str:
        return self.now().isoformat(timespec="milliseconds")

    def head(self, text: str) -> None:
        self.say(f"-----> {text}")

    def detail(self, text: str) -> None:
        self.say(f"       {text}")

    async def _save(self, **changes: object) -> None:
        assert self.record is not None
        self.record = dataclasses.replace(self.record, **changes)  # type: ignore[arg-type]
        await apps.record(self.store, self.prefix, self.record)

    async def stage(self, name: str, work: Callable[[], object]) -> object:
        """Run one stage: print and record its start, end and duration."""
        assert self.record is not None
        if not self.held():
            raise DeployError(
                "lost the deploy lock (etcd unreachable for longer than its lease?); "
                "stopped before " + name
            )
        if name in BEFORE_PROMOTION and self.gone():
            raise DeployError(
                f"the push was disconnected; stopped before {name}, nothing changed "
                "(push again to deploy)"
            )
        started = self._stamp()
        t0 = time.monotonic()
        self.head(f"{name}")
        stages = [*self.record.stages, Stage(name, started)]
        await self._save(stages=tuple(stages))
        ok = False
        try:
            result = work()
            if asyncio.iscoroutine(result):
                result = await result
            ok = True
            return result
        finally:
            stages[-1] = dataclasses.replace(stages[-1], ended=self._stamp(), ok=ok)
            await self._save(stages=tuple(stages))
            self.head(f"{name}: {'done' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s")

    # -- the deploy -------------------------------------------------------------------

    async def deploy(
        self, app: str, src: Source, *, promote: bool = True, canary: int | None = None
    ) -> DeployRecord:
        config = (await apps.load(self.store, self.prefix, app)).config
        target, ref, version, commit = await self.images.receive(app, src)
        deploy_id = apps.deploy_id(self.now(), version)
        self.head(f"{app}: deploying {version} ({ref}) as deploy {deploy_id}")
        if commit is not None:
            self.detail(f"{commit.subject} ({commit.author})")
        async with self._recorded(app, deploy_id, "deploy", ref, version, target):
            await apps.claim(self.store, self.prefix, app, config.service)
            assert self.record is not None
            await pushes.still_current(self.store, self.prefix, self.record, src, self.now())
            svc = (await ops.snapshot(self.store, self.prefix)).services.get(config.service)
            active = svc is not None and svc.spec.active_version == version
            if active and svc and not canary and ops.up_count(svc, version) >= config.replicas:
                self.head(f"{version} is already the active version of {app}")
                return await self._finish("succeeded")
            if src.git_dir is not None and commit is not None:
                git_dir = src.git_dir
                await self.stage("build", lambda: self.images.build(app, git_dir, commit, target))
            else:
                await self.stage("tag", lambda: self.engine.tag(src.image, target))
            await self.stage("push", lambda: self.engine.push(target, self.detail))
            if src.update is not None:
                await self._save(branch=src.update.ref)
            new = Release(app, version, target, deploy_id)
            await self._start_and_gate(new, config, fresh=True)
            if canary is not None:
                await self.stage("canary", lambda: self._canary(config, version, canary))
                return await self._finish("waiting")
            if not promote:
                self.head(
                    f"not promoted (--no-promote): `fluster promote {config.service} "
                    f"{version}` when ready"
                )
                return await self._finish("waiting")
            await self.stage("promote", lambda: self._promote(config, version))
            await self.stage("retire", lambda: self._retire(app, config, version))
            return await self._finish("succeeded")

    @contextlib.asynccontextmanager
    async def _recorded(
        self,
        app: str,
        deploy_id: str,
        kind: Literal["deploy", "rollback"],
        ref: str,
        version: str,
        image: str,
    ) -> AsyncIterator[None]:
        """Hold the app's deploy lock for one deploy or rollback, recorded from its start.

        The record is written once the lock is ours (its `started` is then, not while
        waiting); an error the body raises marks it failed and becomes `DeployFailed`.
        """
        async with deploy_lock(
            self.store,
            self.prefix,
            app,
            deploy_id,
            wait_limit=self.settings.lock_timeout,
            say=self.head,
        ) as held:
            self.held = held
            await self.clean_abandoned(app)
            self.record = DeployRecord(
                id=deploy_id,
                app=app,
                kind=kind,
                ref=ref,
                version=version,
                image=image,
                by=self.settings.by,
                started=self._stamp(),
            )
            await self._save()
            try:
                yield
            except (
                DeployError,
                DockerError,
                ops.Refused,
                ops.WaitTimeout,
                RecordError,
                StoreError,
            ) as exc:
                await self._finish("failed", str(exc))
                raise DeployFailed(str(exc)) from None

    async def clean_abandoned(self, app: str) -> None:
        """Deploys of the app recorded as running while we hold its lock died mid-way
        (killed, the host rebooted): mark them abandoned and remove what they started
        that is not routed. Their lock went with their lease: a live deploy holds it.
        Run by every deploy once it holds the lock, and by `fluster gc APP`."""
        dead = await apps.abandoned(self.store, self.prefix, app)
        if not dead:
            return
        keep = await apps.routed(self.store, self.prefix, app)
        for rec in dead:
            removed = await self.scheduler.remove_deploy(app, rec.id, keep=keep)
            await apps.record(
                self.store,
                self.prefix,
                dataclasses.replace(
                    rec,
                    result="abandoned",
                    finished=rec.finished or self._stamp(),
                    error=rec.error or "the deploy's process died before it finished",
                ),
            )
            self.head(
                f"deploy {rec.id} ({rec.version}) was abandoned mid-way: marked so, "
                f"{removed} of its container(s) removed"
            )

    async def _finish(self, result: str, error: str = "") -> DeployRecord:
        error = printable(error, keep_newlines=True)
        await self._save(result=result, finished=self._stamp(), error=error)
        await apps.trim(self.store, self.prefix, self.record.app if self.record else "")
        assert self.record is not None
        if result != "failed":
            total = (self.now() - datetime.fromisoformat(self.record.started)).total_seconds()
            self.head(f"deploy {self.record.id}: {result} in {total:.1f}s")
        return self.record

    async def _start_and_gate(self, release: Release, config: AppConfig, *, fresh: bool) -> None:
        """Start the version (`fresh`: new containers; else its stopped ones again) and
        wait until it is healthy. Containers of the version that already run (a deploy
        with --no-promote before) are used as they are."""
        ids: list[str] = []
        made: list[str] = []

        async def start() -> None:
            running = [
                r.id
                for r in await self.scheduler.instances(release.app)
                if r.version == release.version and r.state == "running"
            ]
            if fresh and len(running) >= config.replicas:
                ids.extend(running)
                self.detail(f"{len(ids)} container(s) of {release.version} already running")
                return
            if fresh:
                made.extend(await self.scheduler.start(release, config))
                ids.extend(made)
            else:
                ids.extend(await self.scheduler.resume(release, config))
            self.detail(f"{len(ids)} started: {', '.join(short(i) for i in ids)}")

        try:
            await self.stage("start", start)
            await self.stage("healthy", lambda: self.gate.wait(release, config, ids))
        except BaseException:  # a failed gate, etcd gone, Ctrl-C: the new ones go
            if made:
                await self.scheduler.remove_ids(made)
                self.detail(f"removed the {len(made)} new container(s); nothing else changed")
            raise

    async def _release(self, change: release.Release) -> None:
        """`fluster promote`, `canary` or `rollback`, as those commands run it: written,
        an invalid spec it replaced said, and every edge waited for."""
        await release.release(
            self.store,
            self.prefix,
            change,
            say=self.detail,
            warn=lambda text: self.detail(f"warning: {text}"),
            wait=self.settings.wait_timeout,
        )

    async def _promote(self, config: AppConfig, version: str) -> None:
        keep_old = ops.parse_keep_old(config.keep_old)
        await self._release(
            release.Release(
                config.service, version, keep_old=keep_old, min_instances=config.replicas
            )
        )

    async def _canary(self, config: AppConfig, version: str, weight: int) -> None:
        await self._release(release.Release(config.service, version, weight=weight))
        self.detail(
            f"`fluster promote {config.service} {version}` to finish, "
            f"`fluster canary {config.service} {version} --weight 0` to end it"
        )

    async def _retire(self, app: str, config: AppConfig, keep: str) -> None:
        """Let in-flight requests to the old version finish, then stop its containers."""
        old = sorted(
            {r.version for r in await self.scheduler.instances(app) if r.state == "running"}
            - {keep}
        )
        if old:
            await asyncio.sleep(config.drain_seconds)  # the drain period, not synchronisation
        else:
            self.detail("no older version running")
        for version in old:
            count = await self.scheduler.stop(app, version)
            self.detail(
                f"stopped {count} container(s) of {version} "
                f"(kept for `fluster rollback {app}` for {config.keep_old})"
            )
        # Older stopped versions go: a rollback beyond the last one starts from the registry.
        removed = await self.scheduler.remove(app, keep=lambda v: v in (keep, *old))
        if removed:
            self.detail(f"removed {removed} stopped container(s) of older versions")

    # -- rollback ---------------------------------------------------------------------

    async def rollback(self, app: str) -> DeployRecord:
        """Bring the previous version back: its containers, without a build."""
        config = (await apps.load(self.store, self.prefix, app)).config
        svc = (await ops.snapshot(self.store, self.prefix)).services.get(config.service)
        if svc is None or not svc.spec.history:
            raise DeployFailed(f"{app} has no previous version to roll back to")
        previous = svc.spec.history[0]
        image = await self._image_of(app, previous)
        deploy_id = apps.deploy_id(self.now(), previous)
        self.head(f"{app}: rolling back to {previous} as deploy {deploy_id}")
        ref = f"rollback from {svc.spec.active_version}"
        async with self._recorded(app, deploy_id, "rollback", ref, previous, image):
            await apps.claim(self.store, self.prefix, app, config.service)
            old = Release(app, previous, image, deploy_id)
            await self._start_and_gate(old, config, fresh=False)
            await self.stage("promote", lambda: self._release(release.Release(config.service)))
            await self.stage("retire", lambda: self._retire(app, config, previous))
            return await self._finish("succeeded")

    async def _image_of(self, app: str, version: str) -> str:
        """The image a version was deployed from (its deploy record), else the registry's."""
        for rec in reversed(await apps.history(self.store, self.prefix, app)):
            if isinstance(rec, DeployRecord) and rec.version == version and rec.image:
                return rec.image
        return f"{self.settings.registry.rstrip('/')}/{app}:{version}"
