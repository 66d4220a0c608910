"""Canary analysis: a version's share of traffic judged by the edges' own counters.

`analyse` walks a canary through its steps (10 %, then 50 %, ...). At each step it
routes that share to the new version with `canary.analysis` set, so every edge publishes
the service's per-version response counts (reloader/counters.py); it reads them, summed
over every live edge, at the start of the step and again `interval` later, and compares
the two versions over that window:

- the new version's 5xx share of its responses must not exceed the bar: `max_errors`
  percent, or the active version's own 5xx share in the same window when that is higher
  (a backend both depend on failing is not the new version's fault);
- with fewer than `min_requests` responses from the new version, the window grows by
  another interval, at most twice; then the step goes on with a warning (a quiet app is
  not blocked forever, and the operator is told it was not judged).

A step over the bar ends it: the share goes back to 0 (every edge applied) and
`CanaryFailed` says the figures. The caller (the deployer, or `fluster canary --steps`)
then promotes, or retires the new version.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fluster import edges, keys, release
from fluster.store import Store

Say = Callable[[str], None]
EXTENSIONS = 2  # a step with too few responses waits at most this many more intervals
PUBLISH_WAIT = 10.0  # seconds for every live edge's first counters of a step


class CanaryFailed(Exception):
    """A step was over the bar; the canary share is back to 0. The message has figures."""


@dataclass(frozen=True, slots=True)
class Bar:
    steps: tuple[int, ...]
    interval: float = 30.0
    max_errors: float = 1.0  # percent of the new version's responses
    min_requests: int = 20


@dataclass(frozen=True, slots=True)
class Window:
    """One step's figures, summed over every edge."""

    weight: int
    new: tuple[int, int]  # (responses, 5xx) of the new version
    active: tuple[int, int]

    @staticmethod
    def rate(pair: tuple[int, int]) -> float:
        return 100.0 * pair[1] / pair[0] if pair[0] else 0.0

    def bar(self, max_errors: float) -> float:
        return max(max_errors, self.rate(self.active))

    def line(self, max_errors: float) -> str:
        new, active = self.rate(self.new), self.rate(self.active)
        return (
            f"canary {self.weight} %: 5xx {new:.1f} % of {self.new[0]} responses "
            f"(active {active:.1f} % of {self.active[0]}), bar {self.bar(max_errors):.1f} %"
        )


Counts = Mapping[str, Mapping[str, tuple[int, int]]]  # edge -> version -> (responses, 5xx)


async def read(store: Store, prefix: str, service: str) -> dict[str, dict[str, tuple[int, int]]]:
    """Every edge's published counters of `service`: edge -> version -> (responses, 5xx)."""
    base = keys.counters_prefix(prefix, service)
    _, kvs = await store.get_prefix(base)
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for kv in kvs:
        try:
            versions = json.loads(kv.value)["versions"]
            out[kv.key[len(base) :]] = {
                v: (int(c["responses"]), int(c["errors"])) for v, c in versions.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not ours to judge by: an edge that wrote garbage is left out
    return out


def window(weight: int, before: Counts, after: Counts, new: str, active: str) -> Window:
    """What every edge counted between two readings (an edge missing from `before` began
    counting during the window: all it counted is in it)."""

    def total(version: str) -> tuple[int, int]:
        responses = errors = 0
        for edge, versions in after.items():
            now = versions.get(version, (0, 0))
            then = before.get(edge, {}).get(version, (0, 0))
            responses += max(0, now[0] - then[0])
            errors += max(0, now[1] - then[1])
        return responses, errors

    return Window(weight, total(new), total(active))


async def analyse(
    store: Store,
    prefix: str,
    service: str,
    version: str,
    active: str,
    bar: Bar,
    *,
    say: Say,
    warn: Say,
    wait: float,
) -> list[Window]:
    """Walk the canary of `version` through `bar.steps`; returns each step's figures.
    Raises CanaryFailed (share back to 0) when one is over the bar."""
    done = []
    for weight in bar.steps:
        change = release.Release(service, version, weight=weight, analysis=True)
        await release.release(store, prefix, change, say=say, warn=warn, wait=wait)
        before = await _first_readings(store, prefix, service)
        for extension in range(EXTENSIONS + 1):
            await asyncio.sleep(bar.interval)  # the observation window, not synchronisation
            step = window(weight, before, await read(store, prefix, service), version, active)
            if step.new[0] >= bar.min_requests:
                break
            if extension < EXTENSIONS:
                say(f"canary {weight} %: {step.new[0]} responses so far, waiting for "
                    f"{bar.min_requests}")  # fmt: skip
        if step.new[0] < bar.min_requests:
            warn(f"{step.line(bar.max_errors)}: fewer than {bar.min_requests} responses in "
                 f"{(EXTENSIONS + 1) * bar.interval:g}s, not judged; going on")  # fmt: skip
        elif Window.rate(step.new) > step.bar(bar.max_errors):
            await release.release(
                store, prefix, release.Release(service, version, weight=0), say=say, warn=warn,
                wait=wait,
            )  # fmt: skip
            raise CanaryFailed(f"{step.line(bar.max_errors)} -> rolled back")
        else:
            say(step.line(bar.max_errors))
        done.append(step)
    return done


async def _first_readings(store: Store, prefix: str, service: str) -> Counts:
    """The counters at a step's start, once every live edge has published some (an edge
    publishes within a second of seeing the analysis start), or after PUBLISH_WAIT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PUBLISH_WAIT
    while True:
        counts = await read(store, prefix, service)
        live = await edges.reloaders(store, prefix)
        if set(live) <= set(counts) or loop.time() > deadline:
            return counts
        await asyncio.sleep(0.2)  # edges publish about every second: polled
