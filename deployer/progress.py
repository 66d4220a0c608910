"""What a release shows and keeps: its output lines and its record, stage by stage.

`Progress` is the half of `Deployer` (deployer/pipeline.py) that is not about containers:
every stage is printed as it starts and ends (on the terminal of `fluster`, and as
`remote:` lines of `git push`) and recorded with its times in the release's record;
`_recorded` holds the app's deploy lock around one release and turns what fails in it
into `DeployFailed`, the record marked failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from deployer import apps, source
from deployer.engine import DeployError
from deployer.lock import deploy_lock
from deployer.records import AppConfig, DeployRecord, Kind, Stage
from deployer.scheduler import Release
from fluster import ops
from fluster.docker import DockerError
from fluster.records import RecordError
from fluster.store import Store, StoreError
from fluster.text import printable

# Stages that change nothing users see: a push cut off during them stops the deploy.
# From the promotion on, it finishes: half a promotion is worse than a whole one.
BEFORE_PROMOTION = frozenset(
    {"build", "tag", "push", "release", "start", "healthy", "canary", "analysis"}
)


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
    # Return once promoted; `retire_later` (a push's) starts the retirement detached.
    retire_later: Callable[[str, str], None] | None = None


@dataclass(frozen=True, slots=True)
class Source:
    """What to deploy: a git repository and ref, or an image already built."""

    git_dir: Path | None = None
    ref: str = ""
    image: str = ""
    update: source.Update | None = None  # a push: the branch must still be where it was


class DeployFailed(Exception):
    """The deploy stopped; the old version still serves. The message says why."""


class Progress:
    """Output and record of one release (a `Deployer` is one)."""

    store: Store
    prefix: str
    settings: Settings
    say: Callable[[str], None]
    now: Callable[[], datetime]
    gone: Callable[[], bool]
    record: DeployRecord | None
    held: Callable[[], bool]

    async def clean_abandoned(self, app: str) -> None:
        raise NotImplementedError

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

    @contextlib.asynccontextmanager
    async def _recorded(
        self, new: Release, kind: Kind, ref: str, config: AppConfig
    ) -> AsyncIterator[None]:
        """Hold the app's deploy lock for one deploy or rollback, recorded from its start.

        The record is written once the lock is ours (its `started` is then, not while
        waiting); an error the body raises marks it failed and becomes `DeployFailed`.
        """
        async with deploy_lock(
            self.store,
            self.prefix,
            new.app,
            new.deploy_id,
            wait_limit=self.settings.lock_timeout,
            say=self.head,
        ) as held:
            self.held = held
            await self.clean_abandoned(new.app)
            self.record = DeployRecord(
                id=new.deploy_id,
                app=new.app,
                kind=kind,
                ref=ref,
                version=new.version,
                image=new.image,
                by=self.settings.by,
                started=self._stamp(),
                runtime=config.runtime(),
                command=new.command,
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

    async def _finish(self, result: str, error: str = "") -> DeployRecord:
        error = printable(error, keep_newlines=True)
        await self._save(result=result, finished=self._stamp(), error=error)
        await apps.trim(self.store, self.prefix, self.record.app if self.record else "")
        assert self.record is not None
        if result != "failed":
            total = (self.now() - datetime.fromisoformat(self.record.started)).total_seconds()
            self.head(f"deploy {self.record.id}: {result} in {total:.1f}s")
        return self.record
