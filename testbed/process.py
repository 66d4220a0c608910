"""Child processes of tests and the bench: stopped within a bound, never waited on forever."""

from __future__ import annotations

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
