"""Child processes of tests and the bench: stopped within a bound, never waited on forever."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def wait_or_kill(proc: subprocess.Popen[Any], grace: float) -> int:
    """Wait up to `grace` seconds for `proc` to exit, then SIGKILL it; its exit code."""
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class LogFile:
    """A part's log file, appended to by each of its starts. What the last start wrote
    is read from the byte offset where it began (a byte offset, because some parts end
    their lines with CR LF, which text reading would turn into one character)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = 0

    def spawn(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        """Start `argv` with its stdout and stderr appended here."""
        with open(self.path, "ab") as log:
            self.start = log.tell()
            return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT)

    def since_start(self) -> str:
        with open(self.path, "rb") as log:
            log.seek(self.start)
            return log.read().decode(errors="replace")

    def text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""


def cpu_with_children(pid: int) -> float:
    """CPU seconds of `pid` and of the children it waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, cutime, cstime (fields 14-17 of proc(5); here 0-based after the name)
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
