"""One-at-a-time steps of a test run that several pytest workers share (pytest-xdist).

Each worker runs the session fixtures itself; the steps that change the machine (start
dockerd, build the base image, build the project's images) take a file lock, so the
second worker waits for the first and then finds the work done: the scripts are
idempotent. The lock is an flock: it goes with the process that held it, however it died.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCKS = Path(os.environ.get("FLUSTER_TEST_LOCKS", "/tmp/fluster-test-locks"))


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Hold the machine-wide lock `name` for the block."""
    LOCKS.mkdir(parents=True, exist_ok=True)
    with open(LOCKS / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
