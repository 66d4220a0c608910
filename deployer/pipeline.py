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
import fnmatch
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from deployer import apps, dockerfile, source
from deployer.engine import DeployError, Engine, NotFound
from deployer.lock import deploy_lock
from deployer.records import AppConfig, DeployRecord, Stage
from deployer.scheduler import Release, Scheduler
from fluster import keys, ops, release
from fluster.follow import until
from fluster.records import Instance, RecordError
from fluster.runtime import Backoff
from fluster.store import Store, StoreError
from fluster.text import printable

REVISION_LABEL = "org.opencontainers.image.revision"
# Stages that change nothing users see: a push cut off during them stops the deploy.
# From the promotion on, it finishes: half a promotion is worse than a whole one.
BEFORE_PROMOTION = frozenset({"build", "tag", "push", "start", "healthy", "canary"})
IMAGE_ID_RE = re.compile(r"(sha256:)?[0-9a-f]{12,64}")


def repository(name: str) -> str:
    """`host:5000/app:tag` and `host:5000/app@sha256:...` -> `host:5000/app`."""
    name = name.partition("@")[0]
    head, _, tail = name.rpartition("/")
    return f"{head}/{tail.partition(':')[0]}" if head else tail.partition(":")[0]


def short(ref: str) -> str:
    """A container id as `docker ps` shows it; a Swarm service's name as it is."""
    return ref[:12] if len(ref) == 64 else ref


def up_of(value: bytes, version: str) -> bool:
    """Whether an instance record is an up instance of `version` (unreadable: no)."""
    try:
        inst = Instance.parse(value)
    except RecordError:
        return False
    return inst.version == version and inst.state == "up"


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
        target, ref, version, commit = await self._receive(app, src)
        deploy_id = apps.deploy_id(self.now(), version)
        self.head(f"{app}: deploying {version} ({ref}) as deploy {deploy_id}")
        if commit is not None:
            self.detail(f"{commit.subject} ({commit.author})")
        async with self._recorded(app, deploy_id, "deploy", ref, version, target):
            await apps.claim(self.store, self.prefix, app, config.service)
            await self._still_current(src)
            svc = (await ops.snapshot(self.store, self.prefix)).services.get(config.service)
            active = svc is not None and svc.spec.active_version == version
            if active and svc and not canary and ops.up_count(svc, version) >= config.replicas:
                self.head(f"{version} is already the active version of {app}")
                return await self._finish("succeeded")
            if src.git_dir is not None and commit is not None:
                git_dir = src.git_dir
                await self.stage("build", lambda: self._build(app, git_dir, commit, target))
            else:
                await self.stage("tag", lambda: self.engine.tag(src.image, target))
            await self.stage("push", lambda: self.engine.push(target, self.detail))
            if src.update is not None:
                await self._save(branch=src.update.ref)
            release = Release(app, version, target, deploy_id)
            await self._start_and_gate(release, config, fresh=True)
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
            except (DeployError, ops.Refused, ops.WaitTimeout, RecordError, StoreError) as exc:
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

    async def _receive(self, app: str, src: Source) -> tuple[str, str, str, source.Commit | None]:
        """(image name in the registry, ref, version, commit) of what is deployed."""
        registry = self.settings.registry.rstrip("/")
        if src.git_dir is not None:
            commit = await source.resolve(src.git_dir, src.ref)
            return f"{registry}/{app}:{commit.version}", src.ref, commit.version, commit
        if not await self.engine.has_image(src.image):
            self.head(f"pulling {src.image}")
            await self.engine.pull(src.image, self.detail)
        await self._check_labels(src.image)
        labels = await self.engine.image_labels(src.image)
        revision = labels.get(REVISION_LABEL, "")
        if source.SHA_RE.fullmatch(revision):
            version = revision[:12]
        else:
            version = (await self.engine.image_id(src.image)).removeprefix("sha256:")[:12]
        return f"{registry}/{app}:{version}", src.image, version, None

    async def _still_current(self, src: Source) -> None:
        """A push that waited for another deploy: refuse it if that one moved the branch,
        as git would refuse to update the branch from where this push thought it was.

        The other push's receive-pack moves the branch only after its hook (and so its
        hold on the lock) ended: when the last deploy was a push of the same branch that
        has just finished, wait briefly for the branch to get there before comparing.
        """
        if src.git_dir is None or src.update is None:
            return
        update, git_dir = src.update, src.git_dir
        last = await self._previous_push(update.ref)
        deadline = time.monotonic() + 10.0
        now = await source.current(git_dir, update.ref)
        backoff = Backoff(base=0.02, cap=0.5)  # a ref in a file: nothing to follow
        while last and now == update.old != last and time.monotonic() < deadline:
            await backoff.sleep()
            now = await source.current(git_dir, update.ref)
        if now != update.old:
            branch = update.ref.removeprefix("refs/heads/")
            raise DeployError(
                f"{branch} moved to {now[:12]} while this push waited; fetch, merge and push again"
            )

    async def _previous_push(self, ref: str) -> str | None:
        """The commit of a push to `ref` deployed in the last minute, if any."""
        assert self.record is not None
        for rec in reversed(await apps.history(self.store, self.prefix, self.record.app)):
            if not isinstance(rec, DeployRecord) or rec.id == self.record.id:
                continue
            recent = (
                rec.finished
                and (self.now() - datetime.fromisoformat(rec.finished)).total_seconds() < 60
            )
            ok = rec.result in ("succeeded", "waiting") and rec.branch == ref
            return rec.ref if ok and recent and source.SHA_RE.fullmatch(rec.ref) else None
        return None

    async def _build(self, app: str, git_dir: Path, commit: source.Commit, target: str) -> None:
        """Build the pushed tree, within the deploy host's bounds: its size, its time,
        its network, and the images it may start from."""
        limit = self.settings.max_context
        size = await source.context_size(git_dir, commit)
        if size > limit:
            raise DeployError(source.too_big(limit))
        await self._check_bases(app, await source.dockerfile(git_dir, commit))
        network = self.settings.build_network
        self.detail(
            f"context: git archive {commit.sha[:12]} ({size // 1024} KiB), "
            f"network {network}, at most {self.settings.build_timeout:g}s"
        )
        await self.engine.build(
            source.archive(git_dir, commit, limit),
            target,
            {REVISION_LABEL: commit.sha},
            self.detail,
            network=network,
            time_limit=self.settings.build_timeout,
        )
        await self._check_labels(target)

    async def _check_bases(self, app: str, text: str) -> None:
        """Refuse a Dockerfile that builds from an image this app may not use: one that
        is not on the host (a build never pulls), another app's (its files would be
        printed into this push), or one the operator did not allow."""
        registry = self.settings.registry.rstrip("/") + "/"
        own = f"{registry}{app}"
        for ref in dockerfile.images(text):
            where = f"Dockerfile line {ref.line} ({ref.instruction} {ref.image})"
            if IMAGE_ID_RE.fullmatch(ref.image):
                raise DeployError(f"{where}: name the image, not its id")
            try:
                names = await self.engine.image_names(ref.image)
            except NotFound:
                raise DeployError(
                    f"{where}: no such image on this deploy host, and builds never pull; "
                    "the operator loads base images there (docker load, docker build)"
                ) from None
            names = [ref.image, *names]
            if any(repository(n) == own for n in names):
                continue
            others = sorted({repository(n) for n in names if n.startswith(registry)})
            if others:
                raise DeployError(
                    f"{where}: that is app {others[0].removeprefix(registry)}'s image; a build "
                    "may start only from its own app's images and the host's base images"
                )
            allowed = self.settings.base_images
            if allowed and not any(fnmatch.fnmatchcase(n, p) for n in names for p in allowed):
                raise DeployError(
                    f"{where}: not one of the base images this deploy host allows "
                    f"({', '.join(allowed)}; FLUSTER_BASE_IMAGES)"
                )

    async def _check_labels(self, image: str) -> None:
        """An image's `fluster.*` labels would be ignored by the sidekick anyway (only
        labels set on a container count): say so now, rather than at the health gate."""
        labels = await self.engine.image_labels(image)
        claimed = sorted(k for k in labels if k.startswith("fluster."))
        if claimed:
            raise DeployError(
                f"the image sets label(s) {', '.join(claimed)} (LABEL in its Dockerfile or "
                "its base image's): fluster sets fluster.* labels on the containers it starts "
                "and never takes them from an image; remove them"
            )

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
            await self.stage("healthy", lambda: self._gate(release, config, ids))
        except BaseException:  # a failed gate, etcd gone, Ctrl-C: the new ones go
            if made:
                await self.scheduler.remove_ids(made)
                self.detail(f"removed the {len(made)} new container(s); nothing else changed")
            raise

    async def _gate(self, release: Release, config: AppConfig, ids: list[str]) -> None:
        """Until `replicas` instances of the version are registered up (followed in
        etcd as the sidekicks write them), or one crashes (asked of the scheduler, more
        and more rarely), or the push is disconnected."""
        instances = keys.instances_prefix(self.prefix, config.service)
        count = 0

        def enough(kvs: Mapping[str, bytes]) -> int | None:
            nonlocal count
            now = sum(up_of(value, release.version) for value in kvs.values())
            if now != count:
                self.detail(f"{now}/{config.replicas} registered up")
            count = now
            return now if now >= config.replicas else None

        self.detail(f"0/{config.replicas} registered up")
        registered = asyncio.create_task(
            until(self.store, instances, enough, within=config.health_timeout)
        )
        backoff = Backoff(base=0.1, cap=1.0)
        try:
            while not registered.done():
                if self.gone():
                    raise DeployError("the push was disconnected; stopped before the promotion")
                crashed = await self.scheduler.crashed(ids)
                if crashed is not None:
                    cid, lines = crashed
                    raise DeployError(
                        f"instance {short(cid)} of {release.version} exited; its last log "
                        "lines:\n" + "\n".join(f"  {line}" for line in lines)
                    )
                await asyncio.wait({registered}, timeout=backoff.next_delay())
            registered.result()
        except TimeoutError:
            logs = await self._logs(ids)
            raise DeployError(
                f"only {count} of {config.replicas} instance(s) of {release.version} "
                f"registered up within {config.health_timeout:g}s (check {config.check}; "
                "is a sidekick host agent, `sidekick --all`, running on this host?); "
                f"the last log lines:\n{logs}"
            ) from None
        finally:
            registered.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError, TimeoutError):
                await registered

    async def _logs(self, ids: list[str]) -> str:
        out = []
        for cid in ids[:3]:
            try:
                lines = await self.scheduler.logs(cid, 10)
            except DeployError as exc:
                lines = [str(exc)]
            out += [f"  {short(cid)}: {line}" for line in lines] or [f"  {short(cid)}: (no output)"]
        return "\n".join(out)

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
            release = Release(app, previous, image, deploy_id)
            await self._start_and_gate(release, config, fresh=False)
            await self.stage("promote", lambda: self._rolled_back(config))
            await self.stage("retire", lambda: self._retire(app, config, previous))
            return await self._finish("succeeded")

    async def _rolled_back(self, config: AppConfig) -> None:
        await self._release(release.Release(config.service))

    async def _image_of(self, app: str, version: str) -> str:
        """The image a version was deployed from (its deploy record), else the registry's."""
        for rec in reversed(await apps.history(self.store, self.prefix, app)):
            if isinstance(rec, DeployRecord) and rec.version == version and rec.image:
                return rec.image
        return f"{self.settings.registry.rstrip('/')}/{app}:{version}"
