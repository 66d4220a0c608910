"""Real `sidekick` processes against a test etcd, and what they registered (tests and bench)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from fluster.records import Instance
from testbed.etcd import Etcd
from testbed.waiting import wait_for


class SidekickProcess:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log_path = args, env, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidekick.cli", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        lines = [line for line in self.log().splitlines() if line.startswith("{")]
        return [json.loads(line) for line in lines]

    def logged(self, event: str) -> bool:
        return any(e.get("event") == event for e in self.events())

    def logged_at(self, event: str, timeout: float = 5.0) -> float:
        """Unix time of the last `event` in the log: when the sidekick did it, free of
        the delay with which a loaded machine lets a polling test notice. Waits for the
        line: what it says (a record written or deleted) is visible in etcd a moment
        before the sidekick has written it."""

        def stamps() -> list[str]:
            return [str(e["timestamp"]) for e in self.events() if e.get("event") == event]

        found = wait_for(stamps, timeout=timeout, what=f"{event!r} in {self.log_path}")
        return datetime.fromisoformat(found[-1].replace("Z", "+00:00")).timestamp()

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def check(self, *, bare: bool = False) -> subprocess.CompletedProcess[str]:
        """`sidekick --check` with the same flags and environment (`bare`: no flags, as a
        HEALTHCHECK in the sidekick's image runs it)."""
        args = [] if bare else self.args
        return subprocess.run(
            [sys.executable, "-m", "sidekick.cli", *args, "--check"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )


class Sidekicks:
    """Starts sidekicks for one test, stops (SIGKILL) the survivors at the end."""

    def __init__(self, etcd: Etcd, root: Path) -> None:
        self.etcd, self.root = etcd, root
        self.procs: list[SidekickProcess] = []

    def start(self, *args: str, **env: str) -> SidekickProcess:
        n = len(self.procs)
        environ = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SIDEKICK_", "ETCD"))},
            "ETCD_ENDPOINTS": self.etcd.endpoints,
            "SIDEKICK_STATE_DIR": str(self.root / f"state{n}"),
            "SIDEKICK_LOG_LEVEL": "debug",
            **env,
        }
        proc = SidekickProcess(list(args), environ, self.root / f"sidekick{n}.log")
        self.procs.append(proc)
        return proc

    def instances(self, service: str) -> dict[str, Instance]:
        """name -> Instance of every record of `service` (a failed read returns {})."""
        prefix = f"/fluster/services/{service}/instances/"
        out = self.etcd.ctl("get", "--prefix", prefix)
        if out.returncode != 0:
            return {}
        lines = out.stdout.splitlines()
        return {
            k[len(prefix) :]: Instance.parse(v)
            for k, v in zip(lines[::2], lines[1::2], strict=True)
        }

    def lease_of(self, key: str) -> int:
        out = self.etcd.ctl("get", key, "-w", "json", check=True).stdout
        kvs = json.loads(out).get("kvs") or []
        return int(kvs[0].get("lease", 0)) if kvs else 0

    def close(self) -> None:
        for proc in self.procs:
            if proc.proc.poll() is None:
                os.killpg(proc.proc.pid, signal.SIGKILL)
                proc.proc.wait(10)
