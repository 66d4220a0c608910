"""A real reloader (with its real HAProxy) as a child process on loopback ports.

`ReloaderProcess` runs the `reloader` console entry point (signals, supervision and
uvloop as in production) with a private state dir and free ports; `stop()` ends it and
any HAProxy it left behind. Shared by the tests (tests/support/haproxy.py) and the bench.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from reloader.state_dir import StateDir
from testbed.etcd import Etcd
from testbed.ports import PORT_ATTEMPTS, free_port, lost_a_port
from testbed.waiting import Compared, GaveUp, wait_for

HAPROXY = "/usr/sbin/haproxy"


def unix_command(path: Path, command: str, timeout: float = 5.0) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


class Exited(GaveUp):
    """The process ended while we waited for it to come up."""


class ReloaderProcess:
    """The reloader as a child process. With `https`, it binds an HTTPS frontend on
    `https_port` (127.0.0.1) from the start, a port picked and retried like the others."""

    def __init__(
        self, etcd: Etcd, root: Path, *args: str, prefix: str = "/fluster", https: bool = False
    ) -> None:
        self.etcd = etcd
        self.state_dir = root / "state"
        self.http_port = free_port()
        self.status_port = free_port()
        self.https_port = free_port() if https else None
        self.prefix = prefix
        self.args = args
        self.log_path = root / "reloader.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> str:
        return StateDir(self.state_dir).config.read_text()

    def start(self, wait: bool = True) -> ReloaderProcess:
        """Start the reloader; with `wait`, until HAProxy serves. Its ports come from
        `free_port()`, which another process may take before HAProxy (or the status
        server) binds them on a busy machine: then start again on fresh ports."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            if not wait:
                return self
            try:
                wait_for(self._up, timeout=20, what="reloader up")
                return self
            except AssertionError:
                lost = lost_a_port(self.log_since(offset))
                if attempt == PORT_ATTEMPTS or not lost or self.proc.poll() is None:
                    raise
                self.http_port, self.status_port = free_port(), free_port()
                if self.https_port is not None:
                    self.https_port = free_port()
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        env = {
            **os.environ,
            "ETCD_ENDPOINTS": self.etcd.endpoints,
            "FLUSTER_PREFIX": self.prefix,
            "RELOADER_STATE_DIR": str(self.state_dir),
            "RELOADER_HTTP_BIND": f"127.0.0.1:{self.http_port}",
            "RELOADER_STATUS_BIND": f"127.0.0.1:{self.status_port}",
            "RELOADER_HAPROXY": HAPROXY,
            "RELOADER_ID": "edge-test",
        }
        if self.https_port is not None:
            env["RELOADER_HTTPS_BIND"] = f"127.0.0.1:{self.https_port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reloader", "run", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise Exited(f"reloader exited {self.proc.returncode}:\n{self.log()[-3000:]}")
        return bool(self.status().get("haproxy_up"))

    def status(self) -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.status_port, timeout=5)
        try:
            conn.request("GET", "/status")
            return dict(json.loads(conn.getresponse().read()))
        finally:
            conn.close()

    def http_get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.status_port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """/metrics parsed by prometheus_client: `{'name{label="v"}': value}`."""
        status, text = self.http_get("/metrics")
        assert status == 200, f"/metrics answered {status}: {text[:500]}"
        return {
            sample.name
            + (
                "{" + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())) + "}"
                if sample.labels
                else ""
            ): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def get(self, host: str, path: str = "/", port: int | None = None) -> tuple[int, str]:
        """One request through HAProxy with `Host: host`."""
        conn = http.client.HTTPConnection("127.0.0.1", port or self.http_port, timeout=5)
        try:
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def served_by(self, host: str, rounds: int = 8) -> set[str]:
        """Bodies of `rounds` requests that were answered 200."""
        out = set()
        for _ in range(rounds):
            status, body = self.get(host)
            if status == 200:
                out.add(body)
        return out

    def wait_served(self, host: str, expected: set[str], timeout: float = 10.0) -> None:
        wait_for(
            lambda: Compared(
                f"answers for {host}", self.served_by(host, 3 * len(expected) + 2), expected
            ),
            timeout=timeout,
            what=f"{host} served by {sorted(expected)}",
        )

    def master(self, command: str) -> str:
        # The master re-executes itself on reload: its socket is briefly away.
        return str(
            wait_for(
                lambda: unix_command(self.state_dir / "master.sock", command),
                timeout=5,
                interval=0.01,
                what="master CLI",
            )
        )

    def admin(self, command: str) -> str:
        return unix_command(self.state_dir / "admin.sock", command)

    def workers(self) -> list[int]:
        out, section = [], ""
        for line in self.master("show proc").splitlines():
            if line.startswith("#"):
                section = line
            elif section == "# workers" and line.split()[1:2] == ["worker"]:
                out.append(int(line.split()[0]))
        return out

    def haproxy_pid(self) -> int:
        return int((self.state_dir / "haproxy.pid").read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_since(self, offset: int) -> str:
        """The log from byte `offset` on (a byte offset into text read with universal
        newlines would cut at the wrong place)."""
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def stop(self) -> int | None:
        code = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.proc is not None:
            code = self.proc.returncode
        with contextlib.suppress(OSError, ValueError):
            pid = self.haproxy_pid()
            # Only if it outlived us, and only if that pid is still our HAProxy.
            if str(self.state_dir) in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
        return code
