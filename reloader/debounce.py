"""Coalesce bursts of catalog changes into one apply.

A deploy or an etcd recovery can bring a thousand changes in a second; applying each
would mean a thousand reloads. We apply once the stream has been quiet for `quiet`
seconds, but never later than `max_wait` after the first change of a burst, so a
steady trickle cannot starve the apply forever.

The first change after the stream has been quiet anyway (nothing for `quiet` seconds)
is due at once: a lone registration, the common case, should not pay the quiet period
again, and whatever follows it closer than `quiet` is coalesced as above (so a storm
costs one apply more: its first change).

The timing decision (`deadline`, `due`) is pure over an injected clock, so it is tested
without sleeping; `settled()` is the thin async wrapper the reloader awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


class Debouncer:
    def __init__(
        self,
        quiet: float,
        max_wait: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        leading: bool = True,
    ) -> None:
        self.quiet = quiet
        self.max_wait = max(max_wait, quiet)
        self.clock = clock
        self.leading = leading
        self.first: float | None = None
        self.last: float | None = None
        self.previous: float | None = None  # the last change ever, burst or not
        self._event = asyncio.Event()

    def poke(self) -> None:
        """A change arrived."""
        now = self.clock()
        if self.first is None:
            idle = self.previous is None or now - self.previous >= self.quiet
            # Leading edge: backdating the burst's start makes its max wait already over.
            self.first = now - self.max_wait if self.leading and idle else now
        self.last = self.previous = now
        self._event.set()

    @property
    def pending(self) -> bool:
        return self.first is not None

    def deadline(self) -> float | None:
        """When the current burst is due for an apply; None when nothing is pending."""
        if self.first is None or self.last is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_wait)

    def due(self) -> bool:
        """True (and the burst is consumed) when the pending burst should be applied now."""
        deadline = self.deadline()
        if deadline is None or self.clock() < deadline:
            return False
        self.first = self.last = None
        return True

    async def settled(self, limit: float | None = None) -> bool:
        """Wait for a burst to settle (True), or `limit` seconds with nothing due (False)."""
        end = None if limit is None else self.clock() + limit
        while True:
            self._event.clear()
            if self.due():
                return True
            now = self.clock()
            if end is not None and now >= end:
                return False
            wake = self.deadline()
            if wake is None or (end is not None and end < wake):
                wake = end
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._event.wait(), None if wake is None else max(0.0, wake - now)
                )
