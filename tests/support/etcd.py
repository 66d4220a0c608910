"""Real etcd processes for tests: one member or a 3-member cluster on free loopback ports.

Debian's `etcd` binary runs in a temporary directory; members can be stopped, killed,
paused (SIGSTOP, a "frozen" member) and resumed, which is how the fault tests work.
"""

from __future__ import annotations

import os
import shutil
import signal as signals
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import waiting
from tests.support.pki import Pki

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll `predicate` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last: object = waiting.NOTHING
    while time.monotonic() < deadline:
        try:
            value = last = predicate()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise waiting.timed_out(what, timeout, last, last_exc)


async def eventually(
    predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
):  # type: ignore[no-untyped-def]
    """Async `wait_for`: poll `predicate` (sync or async) on the running loop."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last: object = waiting.NOTHING
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            last = value
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        await asyncio.sleep(interval)
    raise waiting.timed_out(what, timeout, last, last_exc)


@dataclass
class Member:
    name: str
    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    pki: Pki | None = None
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

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
        with open(self.data_dir.parent / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)

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
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signals.SIGKILL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


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
        for member in self.members:
            member.start(self.initial_cluster)
        self.wait_healthy()
        return self

    def restart(self, member: Member) -> None:
        member.stop()
        member.start(self.initial_cluster, state="existing")

    def wait_healthy(self, timeout: float = 20.0) -> None:
        live = [m for m in self.members if m.running]
        wait_for(
            lambda: all(
                self.ctl("endpoint", "health", endpoints=m.endpoint).returncode == 0 for m in live
            ),
            timeout=timeout,
            interval=0.1,
            what="etcd healthy",
        )

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


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    """A fresh single-member etcd for one test."""
    cluster = Etcd(tmp_path / "etcd").start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[Etcd]:
    """A fresh 3-member etcd cluster for one test."""
    cluster = Etcd(tmp_path / "etcd", size=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()
