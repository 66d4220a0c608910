"""Two pushes of one branch that waited for each other's deploy lock: the second is
refused when the first moved the branch, as git refuses to update a branch from where
the pusher no longer is."""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING

from deployer import apps, source
from deployer.engine import DeployError
from deployer.records import DeployRecord
from fluster.runtime import Backoff
from fluster.store import Store

if TYPE_CHECKING:
    from deployer.progress import Source


async def still_current(
    store: Store, prefix: str, record: DeployRecord, src: Source, now: datetime
) -> None:
    """A push that waited for another deploy: refuse it if that one moved the branch,
    as git would refuse to update the branch from where this push thought it was.

    The other push's receive-pack moves the branch only after its hook (and so its
    hold on the lock) ended: when the last deploy was a push of the same branch that
    has just finished, wait briefly for the branch to get there before comparing.
    """
    if src.git_dir is None or src.update is None:
        return
    update, git_dir = src.update, src.git_dir
    last = await previous_push(store, prefix, record, update.ref, now)
    deadline = time.monotonic() + 10.0
    head = await source.current(git_dir, update.ref)
    backoff = Backoff(base=0.02, cap=0.5)  # a ref in a file: nothing to follow
    while last and head == update.old != last and time.monotonic() < deadline:
        await backoff.sleep()
        head = await source.current(git_dir, update.ref)
    if head != update.old:
        branch = update.ref.removeprefix("refs/heads/")
        raise DeployError(
            f"{branch} moved to {head[:12]} while this push waited; fetch, merge and push again"
        )


async def previous_push(
    store: Store, prefix: str, record: DeployRecord, ref: str, now: datetime
) -> str | None:
    """The commit of a push to `ref` deployed in the last minute, if any."""
    for rec in reversed(await apps.history(store, prefix, record.app)):
        if not isinstance(rec, DeployRecord) or rec.id == record.id:
            continue
        recent = rec.finished and (now - datetime.fromisoformat(rec.finished)).total_seconds() < 60
        ok = rec.result in ("succeeded", "waiting") and rec.branch == ref
        return rec.ref if ok and recent and source.SHA_RE.fullmatch(rec.ref) else None
    return None
