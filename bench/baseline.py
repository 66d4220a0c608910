"""The naive pipeline most users run today, as the yardstick for P1-P4.

A faithful, small imitation of confd + HAProxy: on every change in etcd, render the whole
config from the same template (the reloader's own render function, so the comparison is
about applying, not templating), skip if the text is unchanged (confd compares checksums),
`haproxy -c` the candidate, then start a new HAProxy with `-sf <old pid>`. No runtime API,
no debounce, no master-worker: every membership change is a full restart, and changes
that arrive during one are handled by the next loop turn, one after another.

Run as `python -m bench.baseline --etcd-endpoints E --prefix P --state-dir D --http-bind
127.0.0.1:PORT`. Counters (changes, checks, reloads, failures) go to `D/baseline.json`
after every turn so the bench can read them without an HTTP server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import adapter
from fluster.catalog import Catalog, Snapshot
from fluster.channel import EtcdSettings, endpoints_from_text
from fluster.runtime import setup_logging
from fluster.store import open_store

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class Baseline:
    def __init__(self, state_dir: Path, http_bind: str) -> None:
        self.state_dir = state_dir
        self.http_bind = http_bind
        self.cfg = state_dir / "haproxy.cfg"
        self.pidfile = state_dir / "haproxy.pid"
        self.counters = {
            "changes": 0,
            "renders": 0,
            "checks": 0,
            "check_failures": 0,
            "reloads": 0,
            "applies": 0,
            "revision": 0,
            "apply_seconds": 0.0,
        }
        self.latest: Snapshot | None = None
        self.changed = asyncio.Event()
        self.last_text = ""

    def on_change(self, snapshot: Snapshot) -> None:
        self.counters["changes"] += 1
        self.latest = snapshot
        self.changed.set()

    async def loop(self) -> None:
        while True:
            await self.changed.wait()
            self.changed.clear()
            assert self.latest is not None
            snapshot = self.latest
            started = time.monotonic()
            text = adapter.render(snapshot, state_dir=self.state_dir, http_bind=self.http_bind)
            self.counters["renders"] += 1
            if text != self.last_text:
                await self.apply(text)
                self.last_text = text
                self.counters["apply_seconds"] += time.monotonic() - started
            self.counters["revision"] = snapshot.revision
            self.save()

    async def apply(self, text: str) -> None:
        candidate = self.state_dir / "haproxy.cfg.new"
        candidate.write_text(text)
        self.counters["checks"] += 1
        check = await asyncio.create_subprocess_exec(
            HAPROXY,
            "-c",
            "-q",
            "-f",
            str(candidate),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await check.communicate()
        if check.returncode != 0:
            self.counters["check_failures"] += 1
            print(err.decode(errors="replace"), file=sys.stderr)
            return
        os.replace(candidate, self.cfg)
        # confd's usual reload_cmd: `haproxy -f cfg -p pid -D -sf $(cat pid)`.
        args = [HAPROXY, "-f", str(self.cfg), "-p", str(self.pidfile), "-D"]
        if self.pidfile.exists() and (old := self.pidfile.read_text().split()):
            args += ["-sf", *old]
            self.counters["reloads"] += 1
        proc = await asyncio.create_subprocess_exec(*args, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            print(err.decode(errors="replace"), file=sys.stderr)
        self.counters["applies"] += 1

    def save(self) -> None:
        tmp = self.state_dir / "baseline.json.tmp"
        tmp.write_text(json.dumps(self.counters))
        os.replace(tmp, self.state_dir / "baseline.json")

    def stop_haproxy(self) -> None:
        if self.pidfile.exists():
            for pid in self.pidfile.read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGUSR1)  # soft stop, like the -sf it replaces


async def main_async(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    store = open_store(EtcdSettings(endpoints=endpoints_from_text(args.etcd_endpoints)))
    await store.connect()
    baseline = Baseline(state_dir, args.http_bind)
    catalog = Catalog(store, args.prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(catalog.run(baseline.on_change), name="catalog"),
        asyncio.create_task(baseline.loop(), name="apply"),
    ]
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    baseline.stop_haproxy()
    await store.close()
    for task in done:
        if task is not stopper and not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--etcd-endpoints", default="127.0.0.1:2379")
    parser.add_argument("--prefix", default="/fluster")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--http-bind", required=True)
    args = parser.parse_args(argv)
    setup_logging("warning")
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
