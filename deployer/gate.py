"""The health gate of a deploy: a new version's containers are started; it waits until
`replicas` of its instances are registered up, following the instance records in etcd
as the sidekicks write them, and fails at once when one of them exits (asked of the
scheduler, more and more rarely) or the push is disconnected."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

from deployer.engine import STEP_ERRORS, DeployError
from deployer.records import AppConfig
from deployer.scheduler import Release, Scheduler
from fluster import keys
from fluster.follow import until
from fluster.records import Instance, RecordError
from fluster.runtime import Backoff
from fluster.store import Store, StoreError


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


class HealthGate:
    def __init__(
        self,
        store: Store,
        prefix: str,
        scheduler: Scheduler,
        detail: Callable[[str], None],
        gone: Callable[[], bool],
    ) -> None:
        self.store, self.prefix, self.scheduler = store, prefix, scheduler
        self.detail, self.gone = detail, gone

    async def wait(self, release: Release, config: AppConfig, ids: list[str]) -> None:
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
            logs = await self.logs(ids)
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

    async def logs(self, ids: list[str]) -> str:
        out = []
        for cid in ids[:3]:
            try:
                lines = await self.scheduler.logs(cid, 10)
            except STEP_ERRORS as exc:
                lines = [str(exc)]
            out += [f"  {short(cid)}: {line}" for line in lines] or [f"  {short(cid)}: (no output)"]
        return "\n".join(out)
