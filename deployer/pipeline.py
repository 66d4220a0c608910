"""A release, stage by stage: receive -> build -> push -> release -> start -> healthy ->
promote -> retire.

There is one way to put a version in front of the users, `Deployer.roll_out`, and three
kinds of release go through it: a code deploy (a push or an image), a config change (the
active release's image with a new config) and a rollback (an earlier release again, with
its config). Each is numbered (v1, v2, ...) once promoted.

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
  without a build until the keep-old window ends;
- a push's `release:` command (Procfile, or the app's `release_command`) runs once in a
  one-off container of the new image before any new instance starts: a non-zero exit
  refuses the push with nothing changed;
- a push returns once the new release serves all traffic: its retirement of the old one
  goes on in `fluster retire` (detached), and ends in the release's record.

Registration is not done here: the sidekick host agent on the machine registers the
containers from their labels, and the health gate waits for those records in etcd.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from deployer import apps, oneoff, pushes
from deployer.engine import DeployError, Engine
from deployer.gate import HealthGate, short
from deployer.images import Images
from deployer.lock import deploy_lock
from deployer.progress import DeployFailed, Progress, Settings, Source
from deployer.records import AppConfig, DeployRecord
from deployer.scheduler import Release, Scheduler
from fluster import analysis, ops, release
from fluster.store import Store


class Deployer(Progress):
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

    # -- the deploy -------------------------------------------------------------------

    async def deploy(
        self,
        app: str,
        src: Source,
        *,
        promote: bool = True,
        canary: int | None = None,
        analysis: Mapping[str, object] | None = None,
    ) -> DeployRecord:
        """A code release: the pushed commit built (or an image taken), its release
        command run, then rolled out; `analysis`: canary_* fields for this deploy only."""
        config = (await apps.load(self.store, self.prefix, app)).config
        if analysis:
            config = config.replace(**analysis)
        target, ref, base, commit = await self.images.receive(app, src)
        procfile = (
            await oneoff.procfile(src.git_dir, commit.sha)
            if src.git_dir is not None and commit is not None
            else oneoff.Procfile()
        )
        command = procfile.web
        history = await apps.history(self.store, self.prefix, app)
        version = apps.version_for(history, base, config, target, command)
        deploy_id = apps.deploy_id(self.now(), version)
        self.head(f"{app}: deploying {version} ({ref}) as deploy {deploy_id}")
        if commit is not None:
            self.detail(f"{commit.subject} ({commit.author})")
        new = Release(app, version, target, deploy_id, command)
        async with self._recorded(new, "deploy", ref, config):
            await apps.claim(self.store, self.prefix, app, config.service)
            assert self.record is not None
            await pushes.still_current(self.store, self.prefix, self.record, src, self.now())
            if commit is not None:
                await self._save(author=commit.author)
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
            if release_command := config.release_command or procfile.release:
                await self.stage(
                    "release", lambda: self._release_phase(new, config, release_command)
                )
            return await self.roll_out(new, config, fresh=True, promote=promote, canary=canary)

    async def reconfigure(self, app: str) -> DeployRecord | None:
        """A config release: the active release's image and command with the app's
        config as it is now; None when the app has no release to restart."""
        config = (await apps.load(self.store, self.prefix, app)).config
        current = await self.active_release(app, config)
        if current is None:
            return None
        base = current.image.rpartition(":")[2] or current.version
        history = await apps.history(self.store, self.prefix, app)
        version = apps.version_for(history, base, config, current.image, current.command)
        if digest_of(current, config) == apps.digest(config, current.image, current.command):
            self.head(f"{app}: {current.name} already runs with this config")
            return current
        deploy_id = apps.deploy_id(self.now(), version)
        self.head(f"{app}: config changed, releasing {version} as deploy {deploy_id}")
        new = Release(app, version, current.image, deploy_id, current.command)
        ref = f"config of {current.name}"
        async with self._recorded(new, "config", ref, config):
            return await self.roll_out(new, config, fresh=True)

    async def rollback(self, app: str, to: str = "") -> DeployRecord:
        """An earlier release again, with its config: `to` names it (`v3`, a sha),
        else the previous active version. Its stopped containers start again (no build);
        when they are gone, new ones start from its image."""
        config = (await apps.load(self.store, self.prefix, app)).config
        history = await apps.history(self.store, self.prefix, app)
        svc = (await ops.snapshot(self.store, self.prefix)).services.get(config.service)
        if to:
            target = apps.find_release(history, to)
            if target is None:
                known = ", ".join(r.name for r in apps.releases(history)[-10:]) or "none"
                raise DeployFailed(f"{app} has no release {to!r} (releases kept: {known})")
        else:
            if svc is None or not svc.spec.history:
                raise DeployFailed(f"{app} has no previous version to roll back to")
            previous = svc.spec.history[0]
            target = next(
                (r for r in reversed(apps.releases(history)) if r.version == previous), None
            ) or DeployRecord(
                id="", app=app, kind="deploy", ref="", version=previous, by="", started="",
                image=f"{self.settings.registry.rstrip('/')}/{app}:{previous}",
            )  # fmt: skip
        if svc is not None and svc.spec.active_version == target.version:
            raise DeployFailed(f"{target.name} ({target.version}) is already the active version")
        config = target.config(config)
        deploy_id = apps.deploy_id(self.now(), target.version)
        label = f"{target.name} ({target.version})" if target.number else target.version
        self.head(f"{app}: rolling back to {label} as deploy {deploy_id}")
        active = svc.spec.active_version if svc else None
        new = Release(app, target.version, target.image, deploy_id, target.command)
        async with self._recorded(new, "rollback", f"rollback from {active} to {label}", config):
            if target.runtime:  # its config is the app's again, as it ran
                await apps.edit(self.store, self.prefix, app, dict(target.runtime))
            return await self.roll_out(new, config, fresh=False)

    async def roll_out(
        self,
        new: Release,
        config: AppConfig,
        *,
        fresh: bool,
        promote: bool = True,
        canary: int | None = None,
    ) -> DeployRecord:
        """The one way a release reaches users: started beside the active one (`fresh`:
        new containers; else its stopped ones again), gated on health, promoted (every
        edge applied it), numbered, then the old one retired (now, or detached)."""
        await self._start_and_gate(new, config, fresh=fresh)
        if canary is not None:
            await self.stage("canary", lambda: self._canary(config, new.version, canary))
            return await self._finish("waiting")
        if not promote:
            self.head(
                f"not promoted (--no-promote): `fluster promote {config.service} "
                f"{new.version}` when ready"
            )
            return await self._finish("waiting")
        # A rollback is the way out of a bad release: never held up by steps.
        if config.canary_steps and self.record is not None and self.record.kind != "rollback":
            await self.stage("analysis", lambda: self._analyse(new, config))
        await self.stage("promote", lambda: self._promote(config, new.version))
        history = await apps.history(self.store, self.prefix, new.app)
        await self._save(number=apps.next_number(history))
        assert self.record is not None
        self.head(f"{new.app}: {self.record.name} serves ({new.version})")
        if self.settings.retire_later is not None:
            self.settings.retire_later(new.app, new.deploy_id)
            self.head("the old release retires in the background (`fluster releases` shows when)")
            return await self._finish("succeeded")
        await self.stage("retire", lambda: self._retire(new.app, config, new.version))
        return await self._finish("succeeded")

    async def _analyse(self, new: Release, config: AppConfig) -> None:
        """Progressive delivery: the new release through the config's canary steps, each
        judged by every edge's counters (fluster.analysis). Over the bar: its share is
        back to 0, its containers go after the drain, and the deploy fails naming the
        figures. Without an active release to compare with, it is promoted at once."""
        svc = (await ops.snapshot(self.store, self.prefix)).services.get(config.service)
        active = svc.spec.active_version if svc else None
        if active is None or active == new.version:
            self.detail("no active release to compare with: promoted without steps")
            return
        bar = analysis.Bar(
            config.canary_steps,
            config.canary_interval,
            config.canary_max_errors,
            config.canary_min_requests,
            config.canary_max_latency or None,
        )
        try:
            await analysis.analyse(
                self.store, self.prefix, config.service, new.version, active, bar,
                say=self.detail, warn=lambda text: self.detail(f"warning: {text}"),
                wait=self.settings.wait_timeout,
            )  # fmt: skip
        except analysis.CanaryFailed as exc:
            self.detail(str(exc))
            await asyncio.sleep(config.drain_seconds)  # requests in flight to it finish
            await self.scheduler.stop(new.app, new.version)
            await self.scheduler.remove(new.app, keep=lambda version: version != new.version)
            raise DeployError(f"{exc}; {active} serves on") from None

    async def retire(self, app: str, deploy_id: str) -> None:
        """A pushed release's retirement, after the push returned: under the app's lock,
        only if it is still the active release (a later one retires for itself)."""
        config = (await apps.load(self.store, self.prefix, app)).config
        async with deploy_lock(
            self.store, self.prefix, app, f"{deploy_id}-retire",
            wait_limit=self.settings.lock_timeout, say=lambda text: None,
        ) as held:  # fmt: skip
            self.held = held
            self.record = rec = next(
                (r for r in await apps.history(self.store, self.prefix, app)
                 if isinstance(r, DeployRecord) and r.id == deploy_id),
                None,
            )  # fmt: skip
            if rec is None:
                return
            svc = (await ops.snapshot(self.store, self.prefix)).services.get(config.service)
            if svc is None or svc.spec.active_version != rec.version:
                self.detail("a later release is active: it retires the old ones")
                return
            await self.stage("retire", lambda: self._retire(app, rec.config(config), rec.version))

    async def active_release(self, app: str, config: AppConfig) -> DeployRecord | None:
        """The newest release of the version the app's service routes to."""
        svc = (await ops.snapshot(self.store, self.prefix)).services.get(config.service)
        active = svc.spec.active_version if svc else None
        history = await apps.history(self.store, self.prefix, app)
        return next((r for r in reversed(apps.releases(history)) if r.version == active), None)

    async def _release_phase(self, new: Release, config: AppConfig, command: str) -> None:
        self.detail(f"$ {command}")
        status = await self.engine.run_once(
            oneoff.name(new.app, "release"),
            oneoff.container_config(new, config, command, self.scheduler.network),
            lambda line: self.detail(line.partition(" ")[2]),
            time_limit=self.settings.build_timeout,
        )
        if status:
            raise DeployError(
                f"the release command exited with status {status}; nothing was started "
                "and the current release still serves"
            )

    async def clean_abandoned(self, app: str) -> None:
        """Deploys of the app recorded as running while we hold its lock died mid-way
        (killed, the host rebooted): mark them abandoned and remove what they started
        that is not routed. Their lock went with their lease: a live deploy holds it.
        Run by every deploy once it holds the lock, and by `fluster gc APP`."""
        dead = await apps.abandoned(self.store, self.prefix, app)
        if not dead:
            return
        await self._end_abandoned_canary(app, {rec.version for rec in dead})
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

    async def _end_abandoned_canary(self, app: str, versions: set[str]) -> None:
        """A deploy that died during its canary analysis left its share routed (it had
        passed its health gate): the share goes back to 0 before its containers go."""
        service = (await apps.load(self.store, self.prefix, app)).config.service
        svc = (await ops.snapshot(self.store, self.prefix)).services.get(service)
        canary = svc.spec.canary if svc else None
        if canary is not None and canary.version in versions and canary.weight:
            self.head(
                f"ending the canary of {canary.version} its dead deploy left at {canary.weight} %"
            )
            await self._release(release.Release(service, canary.version, weight=0))

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


def digest_of(rec: DeployRecord, current: AppConfig) -> str:
    """The digest of what a release runs (its runtime config over `current`)."""
    return apps.digest(rec.config(current), rec.image, rec.command)
