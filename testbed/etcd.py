"""Real etcd processes for tests and the bench: one member or a cluster on loopback ports.

Debian's `etcd` binary runs in a temporary directory; members can be stopped, killed,
paused (SIGSTOP, a "frozen" member) and resumed, which is how the fault tests work.
"""

from __future__ import annotations

import os
import shutil
import signal as signals
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.pki import Pki
from testbed.ports import free_port, start_on_fresh_ports
from testbed.process import wait_or_kill

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


@dataclass
class Member:
    name: str
    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    pki: Pki | None = None
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    _log_start: int = 0

    @property
    def scheme(self) -> str:
        return "https" if self.pki else "http"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, state: str = "new") -> None:
        args = [
            ETCD,
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            f"{self.scheme}://{self.endpoint}",
            "--advertise-client-urls",
            f"{self.scheme}://{self.endpoint}",
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            initial_cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            "fluster-test",
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--log-level",
            "warn",
            "--logger",
            "zap",
            *self.extra,
        ]
        if self.pki:
            args += [
                "--cert-file",
                str(self.pki.server_cert),
                "--key-file",
                str(self.pki.server_key),
                "--trusted-ca-file",
                str(self.pki.ca),
                "--client-cert-auth",
            ]
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def lost_its_port(self) -> bool:
        """Exited because another process bound one of our ports between `free_port()`
        and etcd's own bind (it happens on a busy machine)."""
        if self.proc is None or self.proc.poll() is None:
            return False
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            return b"address already in use" in log.read()

    def send(self, sig: signals.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def pause(self) -> None:
        self.send(signals.SIGSTOP)

    def resume(self) -> None:
        self.send(signals.SIGCONT)

    def stop(self, sig: signals.Signals = signals.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signals.SIGCONT)
            self.proc.send_signal(sig)
            wait_or_kill(self.proc, 10)
        self.proc = None

    def kill(self) -> None:
        self.stop(signals.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class PortTaken(AssertionError):
    """A member could not bind a port that was free a moment before."""


class Etcd:
    """A cluster of `size` members; `endpoints` is the comma-separated client list."""

    def __init__(self, root: Path, size: int = 1, pki: Pki | None = None) -> None:
        self.root = root
        self.pki = pki
        self.members = [Member(f"m{i}", root / f"m{i}.data", pki=pki) for i in range(size)]

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    @property
    def endpoint_list(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def start(self) -> Etcd:
        """Start every member; if one lost a port to another process, start the whole
        cluster again on fresh ports (a new cluster: nothing was written yet)."""

        def attempt() -> Etcd:
            for member in self.members:
                member.start(self.initial_cluster)
            self.wait_healthy()
            return self

        def lost() -> bool:
            return any(m.lost_its_port() for m in self.members)

        def again() -> None:
            self.stop()
            for member in self.members:
                shutil.rmtree(member.data_dir, ignore_errors=True)
                member.client_port, member.peer_port = free_port(), free_port()

        return start_on_fresh_ports(attempt, lost, again, f"etcd (logs in {self.root})")

    def restart(self, member: Member) -> None:
        member.stop()
        member.start(self.initial_cluster, state="existing")

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Every started member answers its health check; PortTaken if one could not bind,
        AssertionError if one exited (a quorum of the others answering is not enough:
        a test of a 3-member cluster would go on with 2)."""
        started = [m for m in self.members if m.proc is not None]
        deadline = time.monotonic() + timeout
        while True:
            answering = all(self.answers(m) for m in started if m.running)
            taken = [m.name for m in started if m.lost_its_port()]
            if taken:
                raise PortTaken(f"etcd members {taken} lost a port; logs in {self.root}")
            exited = [m.name for m in started if not m.running]
            if exited:
                raise AssertionError(f"etcd members {exited} exited; logs in {self.root}")
            if answering:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"etcd not healthy after {timeout}s (members {[m.name for m in started]}); "
                    f"logs in {self.root}"
                )
            time.sleep(0.1)

    def answers(self, member: Member) -> bool:
        return self.ctl("endpoint", "health", endpoints=member.endpoint).returncode == 0

    def ctl(
        self, *args: str, endpoints: str | None = None, check: bool = False, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            ETCDCTL,
            "--endpoints",
            endpoints or self.endpoints,
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "5s",
        ]
        if self.pki:
            cmd += [
                "--cacert",
                str(self.pki.ca),
                "--cert",
                str(self.pki.client_cert("root")),
                "--key",
                str(self.pki.client_key("root")),
            ]
        if user:
            cmd += ["--user", user]
        env = {**os.environ, "ETCDCTL_API": "3"}
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)} failed: {result.stderr}")
        return result

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        extra = [f"--lease={lease}"] if lease else []
        self.ctl("put", *extra, "--", key, value, check=True)  # a value may start with -

    def get_prefix(self, prefix: str) -> dict[str, str]:
        """Every key under `prefix` (`prefix` itself included) with its value."""
        import base64
        import json

        out = self.ctl("get", "--prefix", "-w", "json", "--", prefix, check=True).stdout
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in json.loads(out).get("kvs", [])
        }

    def get(self, key: str) -> str | None:
        """The value of `key`, None when it does not exist."""
        found = {k: v for k, v in self.get_prefix(key).items() if k == key}
        return found.get(key)

    def delete(self, key: str, prefix: bool = False) -> None:
        self.ctl("del", *(["--prefix"] if prefix else []), key, check=True)

    def grant(self, ttl: int) -> str:
        out = self.ctl("lease", "grant", str(ttl), check=True).stdout
        return out.split()[1]  # "lease 694d... granted with TTL(10s)"

    def revision(self) -> int:
        import json

        out = self.ctl(
            "endpoint",
            "status",
            "-w",
            "json",
            endpoints=next(m.endpoint for m in self.members if m.running),
            check=True,
        ).stdout
        return int(json.loads(out)[0]["Status"]["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        rev = revision or self.revision()
        self.ctl("compact", "--physical", str(rev), check=True)
        return rev

    def leader(self) -> Member:
        import json

        for m in self.members:
            if not m.running:
                continue
            out = self.ctl("endpoint", "status", "-w", "json", endpoints=m.endpoint)
            if out.returncode == 0:
                status = json.loads(out.stdout)[0]["Status"]
                if status["leader"] == status["header"]["member_id"]:
                    return m
        raise AssertionError("no leader")

    def stop(self) -> None:
        for member in self.members:
            member.stop()
