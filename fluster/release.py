"""Releasing a version: the one way a service's routing moves, for `fluster` and the deployer.

A release is a promotion (a version becomes the active one), a canary share (a weight
beside the active version) or a rollback (back to the previous active version). Each is
a compare-and-swap of the service's spec (`fluster.ops`), then a wait until every live
reloader has applied it, so that no edge still routes the old way when the caller goes
on (the deployer stops the old containers next). Both callers say the same things the
same way: what was written, an invalid spec it replaced, the edges' progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from fluster import edges, ops
from fluster.store import Store

KEEP_OLD = ops.parse_keep_old(ops.KEEP_OLD_TEXT)

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Release:
    """What to route: `version` (None: the previous active version, a rollback), as the
    active version, or with `weight` as a canary share beside it (0 ends the canary)."""

    service: str
    version: str | None = None
    weight: int | None = None
    keep_old: timedelta = KEEP_OLD
    min_instances: int = 1
    force: bool = False  # promote even with no instance of the version up
    analysis: bool = False  # a canary share the edges count for (fluster.analysis)


async def write(store: Store, prefix: str, release: Release) -> ops.Written:
    """The spec write alone (compare-and-swap); ops.Refused when it is not safe."""
    if release.version is None:
        return await ops.rollback(store, prefix, release.service)
    if release.weight is not None:
        return await ops.canary(
            store, prefix, release.service, release.version, release.weight,
            analysis=release.analysis,
        )  # fmt: skip
    return await ops.promote(
        store,
        prefix,
        release.service,
        release.version,
        min_instances=release.min_instances,
        keep_old=release.keep_old,
        force=release.force,
    )


def warn_replaced(service: str, written: ops.Written, warn: Say) -> None:
    """Say so when the spec written stood over an invalid one: the edges kept the last
    valid spec meanwhile, and that is what the write started from."""
    if bad := written.replaced:
        warn(f"{service}: replaced an invalid spec ({bad.reason}), starting from {bad.start}")


def summary(release: Release, written: ops.Written) -> str:
    service, spec = release.service, written.spec
    if release.version is None:
        active = spec.active_version or "(all)"
        return f"{service}: rolled back to {active} (revision {written.revision})"
    if release.weight is not None:
        share = f"{release.weight}% to {release.version}" if release.weight else "canary ended"
        return f"{service}: {share} (revision {written.revision})"
    return (
        f"{service}: {release.version} is now the active version (revision "
        f"{written.revision}); old instances retire, records kept until {spec.keep_old_until}"
    )


async def release(
    store: Store,
    prefix: str,
    change: Release,
    *,
    say: Say,
    warn: Say,
    wait: float | None = ops.WAIT_TIMEOUT_S,
) -> ops.Written:
    """Write the release, say what it did, and (unless `wait` is None) wait up to `wait`
    seconds for every live reloader to apply it, saying how many have. Raises
    ops.Refused before writing anything, ops.WaitTimeout once written but not applied."""
    written = await write(store, prefix, change)
    if bad := written.replaced:
        warn(
            f"{change.service}: replaced an invalid spec ({bad.reason}), starting from {bad.start}"
        )
    say(summary(change, written))
    if wait is not None:
        await wait_for_edges(store, prefix, written.revision, within=wait, say=say)
    return written


async def wait_for_edges(
    store: Store, prefix: str, revision: int, *, within: float, say: Say
) -> int:
    """Until every live reloader has applied `revision` (ops.WaitTimeout after `within`
    seconds), saying how many have as it changes; returns how many there are."""

    def progress(done: int, total: int, behind: list[str]) -> None:
        if total:
            waiting = f"; waiting for {', '.join(behind)}" if behind else ""
            say(f"  reloaders applied: {done}/{total}{waiting}")

    count = await edges.wait_applied(store, prefix, revision, within=within, progress=progress)
    if not count:
        say("  no live reloader is registered: nothing to wait for")
    return count
