"""The instances of one service as app processes (testbed/app.py), each registered by its
own companion sidekick or by the caller, and request loops through the edges to it:
what the churn scenarios (testbed/churn.py) and the chaos soak (testbed/chaos.py) run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from testbed.etcd import Etcd
from testbed.load import RequestLoops
from testbed.process import wait_or_kill
from testbed.reloader import ReloaderProcess
from testbed.servers import Address
from testbed.sidekick import SidekickProcess
from testbed.waiting import wait_for

SERVICE = "web"


@dataclass
class App:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    sidekick: SidekickProcess | None = None

    @property
    def address(self) -> Address:
        return ("127.0.0.1", self.port)


class Fleet:
    """The service's instances: app processes and their companion sidekicks."""

    def __init__(self, etcd: Etcd, root: Path, ttl: int) -> None:
        self.etcd, self.root, self.ttl = etcd, root, ttl
        self.apps: list[App] = []
        self.made = 0

    def add(self, sidekick: bool = True) -> App:
        """A new instance, registered by a companion sidekick (or by the caller)."""
        self.made += 1
        name = f"app{self.made:03d}"
        portfile = self.root / f"{name}.port"
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "testbed.app", name, str(portfile)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(portfile.exists, timeout=20, what=f"{name} listening (log {self.root})")
        app = App(name, proc, int(portfile.read_text()))
        if sidekick:
            self.register(app)
        self.apps.append(app)
        return app

    def register(self, app: App) -> None:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SIDEKICK_", "ETCD"))},
            "ETCD_ENDPOINTS": self.etcd.endpoints,
            "SIDEKICK_STATE_DIR": str(self.root / "sidekick-state"),
        }
        args = [
            *("--service", SERVICE, "--address", f"127.0.0.1:{app.port}"),
            *("--instance", app.name, "--node", "chaos", "--ttl", str(self.ttl)),
            *("--check", "http:/", "--check-interval", "0.5", "--rise", "1", "--fall", "2"),
            *("--drain-seconds", "1"),
        ]
        app.sidekick = SidekickProcess(args, env, self.root / f"{app.name}.sidekick.log")

    @property
    def expected(self) -> set[Address]:
        return {a.address for a in self.apps}

    def kill(self, app: App) -> None:
        """The app and its sidekick die at once, as a container and its companion do
        when their node dies: nothing drains, the record stays until its lease ends."""
        self.apps.remove(app)
        for proc in (app.proc, app.sidekick.proc if app.sidekick else None):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def stop(self, app: App) -> None:
        """A graceful stop: the sidekick drains and deregisters, then the app goes."""
        self.apps.remove(app)
        if app.sidekick is not None:
            app.sidekick.stop(timeout=30)
        app.proc.terminate()
        wait_or_kill(app.proc, 10)

    def kill_sidekick(self, app: App) -> None:
        assert app.sidekick is not None
        os.killpg(app.sidekick.proc.pid, signal.SIGKILL)
        app.sidekick.proc.wait(10)
        self.register(app)

    def close(self) -> None:
        for app in self.apps:
            for proc in (app.proc, app.sidekick.proc if app.sidekick else None):
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        self.apps.clear()


class Traffic(RequestLoops):
    """Keep-alive and new-connection loops through one edge, failures time-stamped."""

    def __init__(self, edge: ReloaderProcess, limit: float, service: str = SERVICE) -> None:
        super().__init__(edge.http_port, f"{service}.localhost", limit=limit, pace=0.0)
        self.ok = 0
        self.failed_at: list[tuple[float, str]] = []

    def answered(self, body: bytes, sent: float) -> None:
        self.ok += 1

    def _failed(self, keep_alive: bool, what: str) -> None:
        with self.lock:
            kind = "keep-alive" if keep_alive else "new"
            self.failed_at.append((time.monotonic(), f"{kind}: {what}"))


@contextlib.contextmanager
def running(loads: list[Traffic]) -> Iterator[None]:
    """All the request loops running, stopped on leaving."""
    with contextlib.ExitStack() as stack:
        for load in loads:
            stack.enter_context(load)
        yield
