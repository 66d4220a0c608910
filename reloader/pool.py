"""Placing a target model onto the backends HAProxy runs, so that a new HTTP service
needs no reload.

HAProxy 2.6 cannot create a backend at runtime, so every config carries
`pool_size` empty HTTP backends (`pool_0`, ...). A new service whose backend looks
exactly like one of them (mode http, balance roundrobin, no HTTP check, no canary)
takes a free one: its servers are added with `add server` and its routes point at it
with `add map`. A service that goes away leaves its backend empty and unrouted (a pool
backend goes back to the pool). The next reload renders the canonical layout again
(`be_<service>` names, a full pool): the app asks for one when the pool runs low and
the catalog has been quiet, or it comes with the next structural change.

`place(live, target)` is pure: the model HAProxy will run after runtime changes only,
or the reason a reload is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from reloader.model import POOL_BALANCE, POOL_PREFIX, Backend, Model, backend_name


@dataclass(frozen=True, slots=True)
class Placement:
    model: Model | None  # `target` laid onto the live backends; None: reload
    reason: str = ""  # why a reload is needed
    pool_empty: bool = False  # a new service found no free pool backend
    # For each of the target's backends, the index of the live backend that holds it
    # (-1: the target's own pool backends, which only a reload makes).
    slots: tuple[int, ...] = ()


def is_pool(name: str) -> bool:
    return name.startswith(POOL_PREFIX)


def poolable(backend: Backend) -> bool:
    """Whether `backend` can live in a pool backend (which has no option httpchk)."""
    return (
        backend.mode == "http"
        and backend.balance == POOL_BALANCE
        and backend.check_path is None
        and backend.name == backend_name(backend.service)
    )


def free_slots(model: Model) -> int:
    return sum(1 for b in model.backends if is_pool(b.name) and not b.service)


def same_kind(a: Backend, b: Backend) -> bool:
    return (a.mode, a.balance, a.check_path) == (b.mode, b.balance, b.check_path)


def _emptied(backend: Backend) -> Backend:
    """A live backend nothing in the target uses: no servers (a pool one: free again)."""
    service = "" if is_pool(backend.name) else backend.service
    if not backend.servers and backend.service == service:
        return backend
    return replace(backend, servers=(), service=service)


def place(live: Model, target: Model) -> Placement:
    have = live.backend_map()
    pooled = {b.service: b.name for b in live.backends if is_pool(b.name) and b.service}
    placed: dict[str, Backend] = {}  # live backend name -> what it holds now
    rename: dict[str, str] = {}  # target backend name -> live backend name
    new: list[Backend] = []
    for b in target.backends:
        if is_pool(b.name):
            continue  # the target's own (full) pool is what the next reload makes
        if b.name in have:
            if not same_kind(b, have[b.name]):
                return Placement(None, f"{b.name}: mode, balance or check changed")
            placed[b.name] = b
        elif b.service in pooled and poolable(b):
            placed[pooled[b.service]] = replace(b, name=pooled[b.service])
            rename[b.name] = pooled[b.service]
        else:
            new.append(b)
    free = [b.name for b in live.backends if is_pool(b.name) and b.name not in placed]
    for b in new:
        if not poolable(b):
            return Placement(None, f"new backend {b.name} is not a plain HTTP backend")
        if not free:
            return Placement(None, "the backend pool is empty", pool_empty=True)
        slot = free.pop(0)
        placed[slot] = replace(b, name=slot)
        rename[b.name] = slot
    backends = tuple(placed.get(b.name) or _emptied(b) for b in live.backends)
    routes = tuple(
        replace(r, backend=rename[r.backend]) if r.backend in rename else r
        for r in target.http_routes
    )
    adapted = replace(target, http_routes=routes, backends=backends)
    if adapted.structure() != live.structure():
        return Placement(None, "the frontends changed (TCP service, canary, settings)")
    index = {b.name: i for i, b in enumerate(live.backends)}
    slots = tuple(
        -1 if is_pool(b.name) else index[rename.get(b.name, b.name)] for b in target.backends
    )
    return Placement(adapted, slots=slots)


def replace_servers(
    placed: Placement, target: Model, last: Model
) -> tuple[Model, list[tuple[int, Backend]]] | None:
    """`placed` (the placement of `last`) for `target`, when `target` differs from
    `last` in the servers of some backends only (a membership change): the adapted
    model, and (live index, target backend) for each backend whose servers changed.
    None when anything else differs: then `place` works it out whole.

    Backends are compared by identity (the model builder keeps an unchanged service's
    objects), so this costs one pass of pointer comparisons, not a placement."""
    adapted = placed.model
    if adapted is None or len(target.backends) != len(last.backends):
        return None
    for field in ("settings", "http_routes", "tcp_routes", "skipped", "https_bind"):
        if getattr(target, field) is not getattr(last, field):
            return None
    backends = list(adapted.backends)
    changed: list[tuple[int, Backend]] = []
    for i, (new, old) in enumerate(zip(target.backends, last.backends, strict=True)):
        if new is old:
            continue
        slot = placed.slots[i]
        if slot < 0 or (new.name, new.service) != (old.name, old.service):
            return None
        if not same_kind(new, old):
            return None
        held = backends[slot]
        backends[slot] = new if held.name == new.name else replace(new, name=held.name)
        changed.append((slot, backends[slot]))
    return replace(adapted, backends=tuple(backends)), changed
