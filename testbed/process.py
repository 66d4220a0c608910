"""Child processes of tests and the bench: stopped within a bound, never waited on forever."""

from __future__ import annotations

import subprocess
from typing import Any


def wait_or_kill(proc: subprocess.Popen[Any], grace: float) -> int:
    """Wait up to `grace` seconds for `proc` to exit, then SIGKILL it; its exit code."""
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
