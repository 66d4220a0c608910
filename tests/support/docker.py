"""A real Docker engine for tests, and small app containers on it.

`docker_engine` makes sure dockerd answers (scripts/start-dockerd.sh starts it as root
when it does not) and that the base image exists (scripts/base-image.sh builds it from
Debian packages when no registry is reachable, which is the normal case here). Tests
skip only when they cannot possibly run: not root and no engine, or no dockerd binary.

`apps` runs throwaway containers of that image serving HTTP with `python3` (no image
build needed), publishes their port on 127.0.0.1 with a Docker-assigned host port, and
removes them after the test. On the host network (`run_host_app`) the app's port is
written into its labels before it starts, so it comes from `free_port()`; a port another
process took meanwhile is retried on a fresh one.

`PrivateDockerd` is a second engine with its own socket and data root, for the tests
that kill and restart dockerd without disturbing anyone else's containers on the shared
one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.docker import BASE_IMAGE, DOCKER, docker_cmd
from testbed.ports import PORT_ATTEMPTS, lost_a_port
from tests.support.etcd import GaveUp, free_port, wait_for
from tests.support.machine import exclusive

REPO = Path(__file__).resolve().parents[2]
DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"

# The test app: an HTTP server that exits promptly on SIGTERM (as PID 1 it would
# otherwise ignore it) and answers 503 on /health while /tmp/sick exists. It says SERVING
# once its port is bound.
SERVING = "serving on"
APP = """
import http.server, os, signal, sys
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        sick = self.path == "/health" and os.path.exists("/tmp/sick")
        self.send_response(503 if sick else 200)
        self.end_headers()
        self.wfile.write(b"sick" if sick else b"ok")
    def log_message(self, *a):
        pass
server = http.server.ThreadingHTTPServer(("", int(sys.argv[1])), H)
print("serving on", server.server_address[1], flush=True)
server.serve_forever()
"""


@dataclass
class Engine:
    """One Docker engine (its API URL) and the test containers started on it."""

    host: str = "unix:///var/run/docker.sock"
    containers: list[str] = field(default_factory=list)

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return docker_cmd(*args, host=self.host, check=check, timeout=timeout).stdout.strip()

    def run_app(
        self,
        port: int = 8000,
        *,
        labels: dict[str, str] | None = None,
        name: str | None = None,
        publish: bool = True,
        extra: tuple[str, ...] = (),
    ) -> str:
        """Start the test app serving HTTP on `port`; returns the container id."""
        name = name or f"fluster-test-{uuid.uuid4().hex[:10]}"
        args = ["run", "-d", "--name", name, "--label", "fluster.test=1"]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        if publish:
            args += ["-p", f"127.0.0.1::{port}"]
        cid = self.docker(*args, *extra, BASE_IMAGE, "python3", "-c", APP, str(port))
        self.containers.append(cid)
        return cid

    def run_host_app(
        self, labels_for: Callable[[int], dict[str, str]], *, extra: tuple[str, ...] = ()
    ) -> tuple[str, int]:
        """Start the test app on the host network; (container id, its port).

        The port is in the labels (`labels_for(port)`, e.g. `fluster.port`) before the
        app binds it, so it cannot be port 0: it comes from `free_port()`, and when
        another process took it before the app's bind, the container is removed and
        started again on a fresh port, at most PORT_ATTEMPTS times.
        """
        for _ in range(PORT_ATTEMPTS):
            port = free_port()
            cid = self.run_app(
                port, publish=False, labels=labels_for(port), extra=("--network", "host", *extra)
            )
            logs = wait_for(
                lambda cid=cid: self._bound(cid),  # type: ignore[misc]
                timeout=30,
                what=f"test app {cid[:12]} bound to port {port} (or losing it)",
            )
            if SERVING in logs:
                return cid, port
            self.docker("rm", "-f", cid)
            self.containers.remove(cid)
        raise AssertionError(
            f"the test app lost its host port to another process {PORT_ATTEMPTS} times "
            f"in a row (last: {port}): {logs.strip()[-500:]}"
        )

    def _bound(self, cid: str) -> str:
        """The app's output once it bound its port or failed to; "" while it starts."""
        logs = self._logs(cid)
        if SERVING in logs or lost_a_port(logs):
            return logs
        info = self.inspect(cid)
        state, config = info["State"], info["HostConfig"]
        assert isinstance(state, dict) and isinstance(config, dict)
        restarts = config["RestartPolicy"]["Name"] not in ("", "no")
        if state["Status"] == "exited" and not restarts:
            # It may have written its last words and exited between the two reads above.
            logs = self._logs(cid)
            if lost_a_port(logs):
                return logs
            raise GaveUp(f"test app {cid[:12]} exited before serving: {logs[-1000:]}")
        return ""

    def _logs(self, cid: str) -> str:
        result = docker_cmd("logs", cid, host=self.host)
        return result.stdout + result.stderr

    def host_port(self, cid: str, port: int = 8000) -> int:
        out = self.docker("port", cid, f"{port}/tcp")  # "127.0.0.1:49153"
        return int(out.splitlines()[0].rpartition(":")[2])

    def inspect(self, cid: str) -> dict[str, object]:
        data: list[dict[str, object]] = json.loads(self.docker("inspect", cid))
        return data[0]

    def running(self, cid: str) -> bool:
        state = self.inspect(cid)["State"]
        assert isinstance(state, dict)
        return bool(state["Running"])

    def cleanup(self) -> None:
        for cid in self.containers:
            docker_cmd("rm", "-f", cid, host=self.host, check=False)
        self.containers.clear()


def _usable() -> str | None:
    """Why Docker tests cannot run here, or None."""
    if DOCKER is None or not os.path.exists(DOCKERD):
        return "Docker is not installed (apt-get install docker.io)"
    if docker_cmd("info", check=False).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "the Docker engine does not answer and this is not root (cannot start dockerd)"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> Engine:
    """The machine's Docker engine, started if needed, with the base image present."""
    reason = _usable()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "DOCKER": DOCKER or "docker"}
    with exclusive("docker-engine"):  # one pytest worker starts it and builds the base
        subprocess.run(
            [str(REPO / "scripts/start-dockerd.sh")],
            check=True,
            env=env,
            timeout=120,
            capture_output=True,
        )
        subprocess.run(
            [str(REPO / "scripts/base-image.sh")],
            check=True,
            timeout=1200,
            env={**env, "FLUSTER_BASE_PULL": os.environ.get("FLUSTER_BASE_PULL", "0")},
        )
    return Engine()


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project_images(docker_engine: Engine) -> None:
    """The project's images (scripts/build-images.sh: fluster/haproxy, sidekick, etcd, ...)
    on the machine's engine; one pytest worker builds them at a time."""
    with exclusive("docker-engine"):
        subprocess.run(
            [str(REPO / "scripts/build-images.sh")], check=True, capture_output=True, timeout=600
        )


@pytest.fixture
def apps(docker_engine: Engine) -> Iterator[Engine]:
    """The engine, removing the containers a test started when it ends."""
    engine = Engine(docker_engine.host)
    try:
        yield engine
    finally:
        engine.cleanup()


class PrivateDockerd:
    """A second dockerd: own socket, data and exec roots, own bridge, no iptables.

    Never `--bridge none`: a dockerd started so deletes the host's docker0 interface,
    breaking the shared engine. It gets a bridge of its own instead, made here and
    removed afterwards. Test containers on it use the host network, which is all the
    restart tests need. Killing it touches nobody else's containers.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.bridge = "fl" + uuid.uuid4().hex[:8]
        self.proc: subprocess.Popen[bytes] | None = None

    def make_bridge(self) -> None:
        subnet = f"10.254.{uuid.uuid4().int % 250 + 1}.1/24"
        for cmd in (
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", subnet, "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def remove_bridge(self) -> None:
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=10)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        args = [
            DOCKERD,
            "--host",
            self.host,
            "--data-root",
            str(self.root / "data"),
            "--exec-root",
            str(self.root / "exec"),
            "--pidfile",
            str(self.root / "pid"),
            "--bridge",
            self.bridge,
            "--iptables=false",
            "--ip-forward=false",
            "--ip6tables=false",
            "--ip-masq=false",
        ]
        with open(self.root / "dockerd.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True)
        wait_for(
            lambda: docker_cmd("info", host=self.host, check=False).returncode == 0,
            timeout=60,
            interval=0.2,
            what="private dockerd",
        )

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def load_base_image(self) -> None:
        """Copy the base image over from the main engine (docker save | docker load)."""
        self.copy_image(BASE_IMAGE)

    def copy_image(self, image: str) -> None:
        """Copy `image` over from the main engine (docker save | docker load)."""
        with subprocess.Popen([DOCKER or "docker", "save", image], stdout=subprocess.PIPE) as save:
            subprocess.run(
                [DOCKER or "docker", "-H", self.host, "load", "-q"],
                stdin=save.stdout,
                check=True,
                capture_output=True,
                timeout=300,
            )

    def stop_all(self) -> None:
        if self.proc is None:
            return
        ids = docker_cmd("ps", "-aq", host=self.host, check=False).stdout.split()
        if ids:
            docker_cmd("rm", "-f", *ids, host=self.host, check=False)
        self.kill(signal.SIGTERM)


@pytest.fixture
def private_dockerd(docker_engine: Engine) -> Iterator[PrivateDockerd]:
    if os.geteuid() != 0:
        pytest.skip("a second dockerd (and its bridge) can only be started as root")
    # A short path: the unix socket path must fit in 108 bytes.
    root = Path(f"/tmp/fl-dockerd-{uuid.uuid4().hex[:8]}")
    engine = PrivateDockerd(root)
    try:
        engine.make_bridge()
        engine.start()
        engine.load_base_image()
        yield engine
    finally:
        engine.stop_all()
        engine.remove_bridge()
        remove_root(root)


def remove_root(root: Path) -> None:
    """Remove a private dockerd's directory. dockerd leaves mounts under its roots (data
    bind mount, netns): lazily unmount them, deepest first, or it cannot be removed."""
    mounts = [
        line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(f"{root}/")
    ]  # fmt: skip
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, timeout=10)
    shutil.rmtree(root, ignore_errors=True)
