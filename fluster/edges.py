"""What the edges have applied: each reloader's status key (`{prefix}/reloaders/{id}`),
how far behind etcd a revision is, and waiting until every live edge has a revision."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fluster import keys
from fluster.follow import until
from fluster.ops import WaitTimeout
from fluster.records import RecordError, ReloaderStatus
from fluster.store import (
    AuthError,
    Compacted,
    Store,
    StoreError,
    Unavailable,
)


async def reloaders(store: Store, prefix: str) -> dict[str, ReloaderStatus | None]:
    """Every live reloader's last applied revision (None for an unreadable record)."""
    _, kvs = await store.get_prefix(keys.reloaders_prefix(prefix))
    return reloader_statuses({kv.key: kv.value for kv in kvs})


def reloader_statuses(kvs: Mapping[str, bytes]) -> dict[str, ReloaderStatus | None]:
    """Reloader name -> its status record (None when unreadable), from its keys."""
    out: dict[str, ReloaderStatus | None] = {}
    for key, value in kvs.items():
        name = key.rsplit("/", 1)[-1]
        try:
            out[name] = ReloaderStatus.parse(value)
        except RecordError:
            out[name] = None
    return out


AHEAD = -1  # changes_since: the reloader applied a revision etcd has not reached


async def changes_since(store: Store, prefix: str, revision: int) -> int | None:
    """How many service records changed after `revision` (puts plus deletes): what a
    reloader that applied `revision` has still to apply. None when etcd no longer
    keeps that revision (compacted): it is behind by an unknown amount; AHEAD when etcd
    has not reached it (restored from an older backup).

    Three counts, no values: records changed since, records created since, and how
    many there were at `revision`; deleted = then - (now - created since)."""
    services = keys.services_prefix(prefix)
    try:
        changed = await store.count_prefix(services, min_mod_revision=revision + 1)
        created = (
            await store.count_prefix(services, min_create_revision=revision + 1) if changed else 0
        )
        now = await store.count_prefix(services)
        then = await store.count_prefix(services, revision=revision)
    except Compacted:
        return None
    except (Unavailable, AuthError):
        raise
    except StoreError as exc:
        if "future revision" in str(exc):  # etcd restored from an older backup
            return AHEAD
        raise
    return changed + max(0, then - (now - created))


async def wait_applied(
    store: Store,
    prefix: str,
    revision: int,
    *,
    within: float,
    progress: Callable[[int, int, list[str]], None] = lambda done, total, behind: None,
) -> int:
    """Wait until every live reloader has applied `revision`; returns how many there are.

    Follows the reloaders' status keys (each reloader writes its applied revision
    there): no polling. Reloaders that vanish while we wait (their lease expired) stop
    counting.
    """
    reported: tuple[int, int] | None = None
    behind: list[str] = []

    def all_applied(kvs: Mapping[str, bytes]) -> int | None:
        nonlocal reported, behind
        live = reloader_statuses(kvs)
        behind = sorted(
            name for name, st in live.items() if st is None or st.applied_revision < revision
        )
        state = (len(live) - len(behind), len(live))
        if state != reported:
            progress(state[0], state[1], behind)
            reported = state
        return None if behind else len(live)

    try:
        return await until(store, keys.reloaders_prefix(prefix), all_applied, within=within)
    except TimeoutError:
        total = reported[1] if reported else 0
        raise WaitTimeout(
            f"{len(behind)} of {total} reloader(s) had not applied revision {revision} "
            f"after {within:g}s: {', '.join(behind)}"
        ) from None
