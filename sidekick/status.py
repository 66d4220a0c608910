"""A status file in the state dir, so `sidekick --check` can answer for a running sidekick.

The file is rewritten every TTL/3 (no etcd request: it reports what the registrations
already know). `--check` passes while the file is fresh and says every registration is
current, which makes it usable as a Docker HEALTHCHECK of the sidekick's own container
without opening a port.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from sidekick.registration import Registration


def snapshot(regs: Iterable[Registration], every: float) -> dict[str, object]:
    items = [
        {
            "service": r.service,
            "instance": r.name,
            "current": r.current,
            "wanted": r.wanted,
            "registered": r.written,
            "retired": r.retired,
            "lease": None if r.lease is None else f"{r.lease:x}",
        }
        for r in regs
    ]
    return {
        "pid": os.getpid(),
        "at": time.time(),
        "every": every,
        "ok": all(i["current"] for i in items),
        "registrations": items,
    }


def write(path: Path, regs: Iterable[Registration], every: float) -> None:
    """Atomically replace `path` (a reader never sees half a file); `every` is how often
    it is rewritten, so `check` knows when it is stale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(snapshot(regs, every)))
    tmp.replace(path)


def check_all(state_dir: Path) -> tuple[bool, str]:
    """A bare `sidekick --check` (a HEALTHCHECK knows no mode): every sidekick's file."""
    paths = sorted(state_dir.glob("*.json"))
    if not paths:
        return False, f"no status from a running sidekick in {state_dir}"
    results = [check(path) for path in paths]
    failed = [reason for ok, reason in results if not ok]
    return (False, "; ".join(failed)) if failed else (True, "; ".join(r for _, r in results))


def check(path: Path, max_age: float | None = None, now: float | None = None) -> tuple[bool, str]:
    """(ok, reason) for the status file at `path`; stale after 3 missed rewrites."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return False, f"no status from a running sidekick ({path}: {exc})"
    age = (time.time() if now is None else now) - float(data.get("at", 0))
    if max_age is None:
        max_age = max(3 * float(data.get("every", 10)), 5.0)
    if age > max_age:
        return False, f"status is {age:.0f}s old: sidekick stuck or stopped"
    stale = [
        f"{r['service']}/{r['instance']}"
        for r in data.get("registrations", [])
        if not r.get("current")
    ]
    if stale:
        return False, "not registered in etcd: " + ", ".join(stale)
    count = len(data.get("registrations", []))
    return True, f"ok: {count} registration(s) current"
