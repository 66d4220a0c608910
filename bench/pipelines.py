"""The two things being compared, behind one small interface.

`Ours` runs `reloader run`; `Naive` runs bench/baseline.py. Both are started as
separate processes on their own etcd prefix, HTTP port and state directory, so a row
measures whole processes (their CPU, their RSS) the way they run in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from bench import adapter
from bench.adapter import Counts
from reloader.state_dir import StateDir
from testbed.ports import free_port
from testbed.process import wait_or_kill


class Pipeline:
    name = ""
    label = ""

    def __init__(
        self, workdir: Path, etcd_endpoints: str, prefix: str, http_port: int, status_port: int
    ) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.etcd_endpoints = etcd_endpoints
        self.prefix = prefix
        self.http_port = http_port
        self.status_port = status_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "pipeline.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def fresh_ports(self) -> None:
        """New ports after another process took one of ours (see `scenarios.start`)."""
        self.http_port, self.status_port = free_port(), free_port()

    def own_ports_bound(self) -> bool:
        """Whether the ports it serves itself answer; HAProxy's are checked by the caller."""
        return True

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, offset: int) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=log, start_new_session=True
            )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            wait_or_kill(self.proc, 20)
        self.proc = None
        self.kill_leftover_haproxy()

    def kill_leftover_haproxy(self) -> None:
        """HAProxy processes started for this state dir must not outlive the row."""
        for pid in haproxy_pids(self.state_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def config_file(self) -> Path:
        return StateDir(self.state_dir).config

    def config_text(self) -> str:
        path = self.config_file
        return path.read_text() if path.exists() else ""

    def stats_socket(self) -> Path | None:
        return adapter.stats_socket(self.config_text())

    def counts(self) -> Counts:
        raise NotImplementedError

    def tail_log(self, lines: int = 20) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Naive(Pipeline):
    name = "baseline"
    label = "naive confd-style: render, haproxy -c, haproxy -sf"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "bench.baseline",
            "--etcd-endpoints",
            self.etcd_endpoints,
            "--prefix",
            self.prefix,
            "--state-dir",
            str(self.state_dir),
            "--http-bind",
            f"127.0.0.1:{self.http_port}",
        ]

    def counts(self) -> Counts:
        path = self.state_dir / "baseline.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return Counts()
        return Counts(data["applies"], data["reloads"], 0, data["apply_seconds"], data["applies"])


class Ours(Pipeline):
    name = "fluster"
    label = "reloader run"

    def command(self) -> list[str]:
        return adapter.reloader_command(
            state_dir=self.state_dir,
            http_port=self.http_port,
            status_port=self.status_port,
            etcd_endpoints=self.etcd_endpoints,
            prefix=self.prefix,
        )

    def own_ports_bound(self) -> bool:
        """Its status server answers: it is bound after HAProxy started, so HAProxy's
        stats socket answering alone does not say it got its port."""
        url = f"http://127.0.0.1:{self.status_port}/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:  # loopback only
                return "haproxy_up" in json.loads(reply.read())
        except (OSError, ValueError):
            return False

    def counts(self) -> Counts:
        return adapter.reloader_counts(self.status_port)


def haproxy_pids(state_dir: Path) -> list[int]:
    """Processes whose command line mentions a file in `state_dir` and that are haproxy."""
    marker = str(state_dir).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        is_haproxy = cmdline.startswith(b"/usr/sbin/haproxy") or b"haproxy\0" in cmdline[:40]
        if is_haproxy and marker in cmdline:
            pids.append(int(entry.name))
    return pids


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
