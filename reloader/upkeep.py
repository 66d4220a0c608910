"""The apply loop's work off the latency path, and when each piece is due.

When the catalog is quiet: write the files for the runtime changes HAProxy runs (or at
the latest WRITE_MAX after the first), check them on a timer (a whole-file `haproxy -c`
costs 30-100 ms of CPU: at most once per CHECK_EVERY, so a lone change every few seconds
does not pay one each; at the latest CHECK_MAX after the first unchecked write, quiet or
not), and refill the backend pool with a reload once it is below half. Each time is a
`time.monotonic()` value, None when there is nothing to do.
"""

from __future__ import annotations

import time

from reloader.apply import Applier

WRITE_QUIET = 0.5
WRITE_MAX = 5.0
CHECK_QUIET = 2.0
CHECK_EVERY = 60.0
CHECK_MAX = 300.0
REFILL_QUIET = 10.0


def due(at: float | None) -> bool:
    return at is not None and at <= time.monotonic()


class Upkeep:
    def __init__(self, applier: Applier, pool_size: int) -> None:
        self.applier, self.pool_size = applier, pool_size

    def write_at(self, changed_at: float) -> float | None:
        since = self.applier.unwritten_since
        if since is None:
            return None
        return min(changed_at + WRITE_QUIET, since + WRITE_MAX)

    def check_at(self, changed_at: float) -> float | None:
        since = self.applier.unchecked_since
        if since is None:
            return None
        quiet = changed_at + CHECK_QUIET
        return min(max(quiet, self.applier.checked_at + CHECK_EVERY), since + CHECK_MAX)

    def refill_at(self, changed_at: float) -> float | None:
        if self.applier.live is None or 2 * self.applier.pool_free >= self.pool_size:
            return None
        return changed_at + REFILL_QUIET

    def times(self, changed_at: float) -> list[float | None]:
        return [self.write_at(changed_at), self.check_at(changed_at), self.refill_at(changed_at)]
