"""Canary analysis: a version's share of traffic judged by the edges' own counters.

`analyse` walks a canary through its steps (10 %, then 50 %, ...). At each step it
routes that share to the new version with `canary.analysis` set, so every edge publishes
the service's per-version response counts (reloader/counters.py); it reads them, summed
over every live edge, at the start of the step and again `interval` later, and compares
the two versions over that window:

- the new version's 5xx share of its responses must not exceed the bar: `max_errors`
  percent, or the active version's own 5xx share in the same window when that is higher
  (a backend both depend on failing is not the new version's fault);
- with `max_latency` set, the new version's mean response time (HAProxy's, over each
  edge's last 1024 responses, weighted by what each edge counted in the window) must not
  exceed it, or the active version's when that is higher;
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
    max_latency: float | None = None  # seconds of mean response time; None: not judged


@dataclass(frozen=True, slots=True)
class Window:
    """One step's figures, summed over every edge."""

    weight: int
    new: tuple[int, int]  # (responses, 5xx) of the new version
    active: tuple[int, int]
    new_ms: float = 0.0  # mean response time, weighted over the edges
    active_ms: float = 0.0

    @staticmethod
    def rate(pair: tuple[int, int]) -> float:
        return 100.0 * pair[1] / pair[0] if pair[0] else 0.0

    def bar(self, max_errors: float) -> float:
        return max(max_errors, self.rate(self.active))

    def latency_bar(self, max_latency: float) -> float:
        return max(max_latency * 1000, self.active_ms)

    def slow(self, max_latency: float | None) -> bool:
        return max_latency is not None and self.new_ms > self.latency_bar(max_latency)

    def line(self, max_errors: float, max_latency: float | None = None) -> str:
        new, active = self.rate(self.new), self.rate(self.active)
        text = (
            f"canary {self.weight} %: 5xx {new:.1f} % of {self.new[0]} responses "
            f"(active {active:.1f} % of {self.active[0]}), bar {self.bar(max_errors):.1f} %"
        )
        if max_latency is not None:
            text += (
                f"; mean response {self.new_ms:.0f} ms (active {self.active_ms:.0f} ms), "
                f"bar {self.latency_bar(max_latency):.0f} ms"
            )
        return text


# edge -> version -> (responses, 5xx, mean response ms)
Counts = Mapping[str, Mapping[str, tuple[int, int, int]]]


async def read(
    store: Store, prefix: str, service: str
) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Every edge's published counters of `service`."""
    base = keys.counters_prefix(prefix, service)
    _, kvs = await store.get_prefix(base)
    out: dict[str, dict[str, tuple[int, int, int]]] = {}
    for kv in kvs:
        try:
            versions = json.loads(kv.value)["versions"]
            out[kv.key[len(base) :]] = {
                v: (int(c["responses"]), int(c["errors"]), int(c.get("rtime_ms", 0)))
                for v, c in versions.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # not ours to judge by: an edge that wrote garbage is left out
    return out


def window(weight: int, before: Counts, after: Counts, new: str, active: str) -> Window:
    """What every edge counted between two readings (an edge missing from `before` began
    counting during the window: all it counted is in it)."""

    def total(version: str) -> tuple[tuple[int, int], float]:
        responses = errors = 0
        weighted = 0.0
        for edge, versions in after.items():
            now = versions.get(version, (0, 0, 0))
            then = before.get(edge, {}).get(version, (0, 0, 0))
            counted = max(0, now[0] - then[0])
            responses += counted
            errors += max(0, now[1] - then[1])
            weighted += counted * now[2]
        return (responses, errors), (weighted / responses if responses else 0.0)

    (new_counts, new_ms), (active_counts, active_ms) = total(new), total(active)
    return Window(weight, new_counts, active_counts, new_ms, active_ms)


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
        line = step.line(bar.max_errors, bar.max_latency)
        if step.new[0] < bar.min_requests:
            warn(f"{line}: fewer than {bar.min_requests} responses in "
                 f"{(EXTENSIONS + 1) * bar.interval:g}s, not judged; going on")  # fmt: skip
        elif Window.rate(step.new) > step.bar(bar.max_errors) or step.slow(bar.max_latency):
            await release.release(
                store, prefix, release.Release(service, version, weight=0), say=say, warn=warn,
                wait=wait,
            )  # fmt: skip
            raise CanaryFailed(f"{line} -> rolled back")
        else:
            say(line)
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
