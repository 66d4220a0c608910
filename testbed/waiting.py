"""Waiting with a deadline, for tests and the bench: what a wait that timed out saw.

`wait_for` polls a predicate until it answers truthy and ends a wait in vain with a
message of three parts: what was awaited, the predicate's last answer, and (in a test)
the directory holding the logs of every process it started, which tests/support/waiting.py
sets through `set_log_dir`. A predicate that compares two sides returns a `Compared`,
falsy while they differ and printed as both sides with their difference, so "HAProxy
equal to etcd" fails with the two sets rather than with `False`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

_log_dir: Path | None = None


def set_log_dir(path: Path | None) -> None:
    """Where the processes of the running test log (None: outside a test)."""
    global _log_dir
    _log_dir = path


class GaveUp(AssertionError):
    """Raised by a `wait_for` predicate that knows waiting longer cannot help."""


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last: object = NOTHING
    while time.monotonic() < deadline:
        try:
            value = last = predicate()
            if value:
                return value
        except GaveUp:
            raise
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise timed_out(what, timeout, last, last_exc)


@dataclass(frozen=True)
class Compared:
    """`got == want`, remembering both: `wait_for(lambda: Compared("HAProxy", a, b))`."""

    what: str
    got: object
    want: object

    def __bool__(self) -> bool:
        return self.got == self.want

    def __repr__(self) -> str:
        got, want = self.got, self.want
        if isinstance(got, dict) and isinstance(want, dict):  # per key, only what differs
            keys = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            parts = [repr(Compared(str(k), got.get(k), want.get(k))) for k in keys]
            return f"{self.what}: " + ("; ".join(parts) or "equal")
        text = f"{self.what}: got {_show(got)}, want {_show(want)}"
        if isinstance(got, set | frozenset) and isinstance(want, set | frozenset):
            text += f" (missing {_show(want - got)}, extra {_show(got - want)})"
        return text


def _show(value: object) -> str:
    if isinstance(value, set | frozenset):
        return "{" + ", ".join(sorted(map(str, value))) + "}"
    return repr(value)


def timed_out(
    what: str, timeout: float, last: object, last_exc: BaseException | None
) -> AssertionError:
    lines = [f"timed out after {timeout}s waiting for {what}"]
    if isinstance(last, Compared):
        lines.append(f"  last seen: {last!r}")
    elif last is not _NOTHING:
        lines.append(f"  last answer: {last!r}")
    if last_exc is not None:
        lines.append(f"  last error: {last_exc!r}")
    if _log_dir is not None:
        logs = sorted(
            str(p.relative_to(_log_dir))
            for p in _log_dir.rglob("*")
            if p.is_file() and (p.suffix == ".log" or p.name in ("stderr", "stdout"))
        )
        lines.append(f"  logs kept in {_log_dir}" + (f": {', '.join(logs[:12])}" if logs else ""))
    return AssertionError("\n".join(lines))


_NOTHING = object()  # the predicate never answered (it raised every time)
NOTHING = _NOTHING
