"""The local cluster end to end, on a real Docker engine: what `make demo` promises.

Builds the images (scripts/build-images.sh: wheels, the base image from Debian packages
when no registry answers, the four images), brings the compose project up under a name of
its own on free host ports, then, while a bounded request loop runs through HAProxy:
scales web 1 -> 3 -> 1, starts web v2 beside v1 and promotes it with `fluster promote`.
Not one request may fail and every instance must have served. The reloader's status page,
opened in headless Chromium, must show the service. The project is always torn down.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testbed.docker import docker_cmd
from testbed.ports import PORT_ATTEMPTS, lost_a_port
from tests.support.etcd import free_port, wait_for
from tests.support.machine import exclusive

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
DOCKER = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else shutil.which("docker")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def compose_command() -> list[str]:
    """docker-compose 1.29, else Compose v2; FLUSTER_COMPOSE="docker compose" chooses."""
    if os.environ.get("FLUSTER_COMPOSE"):
        return os.environ["FLUSTER_COMPOSE"].split()
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    probe = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False, timeout=30
    )
    if probe.returncode == 0:
        return ["docker", "compose"]
    pytest.skip("neither docker-compose nor the Compose v2 plugin is installed")


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@dataclass
class Project:
    """One compose project on its own name and host ports."""

    compose: list[str]
    name: str
    http_port: int
    status_port: int
    stats_port: int

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.name,
            "FLUSTER_HTTP_PORT": str(self.http_port),
            "FLUSTER_STATUS_PORT": str(self.status_port),
            "FLUSTER_STATS_PORT": str(self.stats_port),
        }

    def __call__(self, *args: str, timeout: float = 120) -> str:
        return run([*self.compose, *args], env=self.env, timeout=timeout)

    def down(self, grace: int = 30) -> None:
        """Take the project down, and fail if a container of it is left (it would hold
        ports). A network whose removal dockerd refuses with "has active endpoints"
        while none of its containers exist any more is dockerd's own stale state (seen
        once on a busy machine, still there 20 minutes later, with no container
        attached): asked again for a while, then reported and left, since it holds no
        port."""
        args = ["down", "--volumes", "--remove-orphans", "--timeout", str(grace)]
        deadline = time.monotonic() + 15
        while True:
            proc = subprocess.run(
                [*self.compose, *args], cwd=REPO, env=self.env, capture_output=True, text=True,
                timeout=180, check=False,
            )  # fmt: skip
            if proc.returncode == 0:
                return
            failure = f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            assert "has active endpoints" in proc.stderr, failure
            left = docker_cmd(
                "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.name}"
            ).stdout.split()
            assert not left, f"{failure}\ncontainers left: {left}"
            if time.monotonic() > deadline:
                print(f"warning: dockerd kept a network of {self.name} with a stale endpoint")
                return
            time.sleep(1)  # dockerd's own pace: retried, not a synchronisation

    def up(self, *args: str, timeout: float = 180) -> None:
        """`up -d --no-build ARGS` on the project's host ports; when Docker could not
        bind one because another process took it after `free_port()`, the project is
        taken down and brought up again on fresh ports, at most PORT_ATTEMPTS times.

        Host ports are fixed for the project's life, not left to Docker to pick (`::80`):
        a later `up` that recreates the haproxy container (the documented steps may)
        would move a Docker-picked port from under the request loop."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            proc = subprocess.run(
                [*self.compose, "up", "-d", "--no-build", *args],
                cwd=REPO,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if proc.returncode == 0:
                return
            output = f"{proc.stdout}\n{proc.stderr}"
            if not lost_a_port(output) or attempt == PORT_ATTEMPTS:
                lost = f" (attempt {attempt}: a host port was taken)" if lost_a_port(output) else ""
                raise AssertionError(f"compose up exited {proc.returncode}{lost}:\n{output}")
            print(f"compose up: host port {self.http_port} or {self.status_port} taken; again")
            self.down(grace=5)
            self.http_port, self.status_port = free_port(), free_port()

    def containers(self, service: str) -> set[str]:
        """Ids (12 characters, the containers' hostnames) of the service's containers."""
        assert DOCKER is not None
        out = run(
            [
                DOCKER,
                "ps",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={self.name}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            ]
        )
        return {line[:12] for line in out.split()}


HEADERS = {"Host": "web.localhost", "Accept": "application/json"}
# What a reused keep-alive connection that the server closed meanwhile looks like: every
# HTTP client retries an idempotent request once on a fresh connection then (RFC 9110
# 9.2.2), so a stale connection is a retry, not a failed request.
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def answer_of(resp: http.client.HTTPResponse) -> dict[str, str]:
    body = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
    answer: dict[str, str] = json.loads(body)
    return answer


def get(port: int, timeout: float = 5.0) -> dict[str, str]:
    """One request through HAProxy on a new connection; the app's JSON answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers=HEADERS)
        return answer_of(conn.getresponse())
    finally:
        conn.close()


@dataclass
class KeepAlive:
    """A client holding one connection to HAProxy across requests, like a browser."""

    port: int
    timeout: float = 5.0
    retries: int = 0
    connections: int = 0
    conn: http.client.HTTPConnection | None = None
    used: int = 0  # requests completed on `conn`

    def get(self) -> dict[str, str]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.connections += 1
            self.used = 0
        try:
            self.conn.request("GET", "/", headers=HEADERS)
            resp = self.conn.getresponse()
        except STALE:
            self.close()
            if not self.used:
                raise
            self.retries += 1
            return self.get()
        except Exception:
            self.close()
            raise
        try:
            answer = answer_of(resp)
        finally:
            if resp.will_close:
                self.close()
        self.used += 1
        return answer

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


@dataclass
class Load:
    """A bounded request loop until stopped or `limit` requests in all: `fresh` threads
    sending one request per connection, `keepalive` threads reusing theirs. Records who
    answered each request, and every failure."""

    port: int
    fresh: int = 2
    keepalive: int = 1
    limit: int = 200_000
    answers: list[tuple[str, str]] = field(default_factory=list)  # (instance, version)
    failures: list[str] = field(default_factory=list)
    clients: list[KeepAlive] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        senders = [lambda: get(self.port)] * self.fresh
        for _ in range(self.keepalive):
            client = KeepAlive(self.port)
            self.clients.append(client)
            senders.append(client.get)
        for i, send in enumerate(senders):
            thread = threading.Thread(target=self._loop, args=(send,), name=f"load-{i}")
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def _loop(self, send: Callable[[], dict[str, str]]) -> None:
        while not self._stop.is_set():
            with self._lock:
                if len(self.answers) + len(self.failures) >= self.limit:
                    return
            try:
                answer = send()
            except Exception as exc:  # every failure is the finding
                with self._lock:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {exc!r}")
            else:
                with self._lock:
                    self.answers.append((answer["instance"], answer["version"]))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        for client in self.clients:
            client.close()

    def recent(self, n: int) -> list[tuple[str, str]]:
        with self._lock:
            return self.answers[-n:]

    def seen(self) -> set[str]:
        with self._lock:
            return {instance for instance, _ in self.answers}

    def total(self) -> int:
        with self._lock:
            return len(self.answers) + len(self.failures)


@pytest.fixture(scope="module")
def images() -> None:
    if DOCKER is None:
        pytest.skip("Docker is not installed")
    if subprocess.run([DOCKER, "info"], capture_output=True, check=False).returncode != 0:
        if os.geteuid() != 0:
            pytest.skip("the Docker engine does not answer and this is not root")
        with exclusive("docker-engine"):
            run([str(REPO / "scripts/start-dockerd.sh")], timeout=120)
    start = time.monotonic()
    with exclusive("docker-engine"):  # the same image tags: one pytest worker at a time
        run([str(REPO / "scripts/build-images.sh")], timeout=420)
    print(f"images built in {time.monotonic() - start:.0f}s")


@pytest.fixture(scope="module")
def project(images: None) -> Iterator[Project]:
    proj = Project(
        compose=compose_command(),
        name=f"fluster-e2e-{uuid.uuid4().hex[:8]}",
        http_port=free_port(),
        status_port=free_port(),
        stats_port=free_port(),
    )
    try:
        proj.up("--scale", "web=1")
        wait_for(lambda: get(proj.http_port, timeout=2), timeout=90, what="web through HAProxy")
        yield proj
    finally:
        logs = subprocess.run(
            [*proj.compose, "logs", "--no-color", "--tail=40"],
            cwd=REPO,
            env=proj.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        print(logs.stdout[-20_000:])
        # Always tear down, and fail if that did not work: a left-over project holds ports.
        proj.down()


def scale(project: Project, service: str, n: int) -> None:
    project(
        "up", "-d", "--no-build", "--no-deps", "--scale", f"{service}={n}", service, timeout=120
    )


@pytest.mark.timeout(900)  # includes building the images on a fresh machine
def test_scale_and_promote_without_a_failed_request(project: Project) -> None:
    load = Load(project.http_port)
    served: set[str] = set()
    load.start()
    try:
        scale(project, "web", 3)
        v1 = project.containers("web")
        assert len(v1) == 3
        wait_for(lambda: v1 <= load.seen(), timeout=60, what="all three v1 instances answering")

        scale(project, "web", 1)  # returns once the two stopped containers are gone
        (survivor,) = project.containers("web")
        wait_for(
            lambda: {i for i, _ in load.recent(40)} == {survivor},
            timeout=60,
            what="only the remaining v1 instance answering",
        )

        scale(project, "web-v2", 2)
        v2 = project.containers("web-v2")
        assert len(v2) == 2
        # No spec yet: v1 and v2 serve side by side.
        wait_for(lambda: v2 <= load.seen(), timeout=60, what="both v2 instances answering")

        project(
            "exec",
            "-T",
            "sidekick",
            "fluster",
            "promote",
            "web",
            "v2",
            "--min-instances",
            "2",
            "--wait-timeout",
            "60",
            timeout=90,
        )
        wait_for(
            lambda: {v for _, v in load.recent(40)} == {"v2"},
            timeout=60,
            what="only v2 answering after the promotion",
        )
        served = v1 | v2
    finally:
        load.stop()
    counts: dict[str, int] = {}
    for instance, version in load.answers:
        counts[f"{version}/{instance}"] = counts.get(f"{version}/{instance}", 0) + 1
    retries = sum(c.retries for c in load.clients)
    connections = sum(c.connections for c in load.clients)
    print(
        f"requests: {load.total()}, failed: {len(load.failures)}, keep-alive client: "
        f"{connections} connections, {retries} retries on a stale one; per instance: {counts}"
    )
    assert load.failures == [], (
        f"{len(load.failures)} of {load.total()} failed: {load.failures[:10]}"
    )
    assert served <= load.seen()


PROBE = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], 2379), timeout=3).close()
    print("reached")
except OSError as exc:
    print(f"unreachable: {exc}")
"""


@pytest.mark.timeout(900)  # alone (-k), it sets the project up too
def test_an_app_container_cannot_reach_etcd(project: Project) -> None:
    """etcd is on the `control` network, the apps on `apps`: an app container cannot open
    a connection to etcd's address, which the edge (on both) can. By IP, so no DNS query
    for a name the app's network does not know ever leaves the machine."""
    assert DOCKER is not None
    (etcd,) = project.containers("etcd")
    addresses = run(
        [DOCKER, "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
         etcd]
    ).split()  # fmt: skip
    assert len(addresses) == 1, f"etcd should be on the control network only: {addresses}"
    (web,) = sorted(project.containers("web"))[:1]
    networks = run([DOCKER, "inspect", "-f", "{{json .NetworkSettings.Networks}}", web])
    assert f"{project.name}_control" not in networks, networks
    edge = project("exec", "-T", "haproxy", "python3", "-c", PROBE, addresses[0])
    assert edge.strip() == "reached", f"the edge must reach etcd at {addresses[0]}: {edge}"
    app = project("exec", "-T", "web", "python3", "-c", PROBE, addresses[0])
    assert app.startswith("unreachable"), f"an app container reached etcd: {app}"


@pytest.mark.timeout(900)  # alone (-k), it sets the project up too
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_status_page_in_headless_chromium(project: Project) -> None:
    assert CHROMIUM is not None
    url = f"http://127.0.0.1:{project.status_port}/"
    web = project.containers("web") | project.containers("web-v2")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:

        def dom() -> str:
            proc = subprocess.run(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--disable-dev-shm-usage",
                    f"--user-data-dir={profile}",
                    "--dump-dom",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            return proc.stdout

        def shows_everything() -> str:
            page = dom()
            # The service, and every running container of it (instance names carry the
            # container's short id).
            service = re.search(r">\s*web\s*<", page)  # an element whose text is "web"
            return page if service and all(c in page for c in web) else ""

        page = wait_for(shows_everything, timeout=60, what=f"status page listing web and {web}")
    assert "reloader" in page.lower()


def documented_steps() -> list[list[str]]:
    """The commands of docs/DEPLOYING.md's "A deploy, by hand", as written there."""
    text = (REPO / "docs" / "DEPLOYING.md").read_text()
    block = text.split("A deploy, by hand", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return [shlex.split(line) for line in lines if line]


@pytest.mark.timeout(900)
def test_the_documented_deploy_by_hand_never_fails_a_request(images: None) -> None:
    """Follows docs/DEPLOYING.md's by-hand deploy line by line, on a fresh project of its
    own, under a request loop: not one request may fail (a bare `up --scale web=3` after
    the promotion used to stop every v2 container), and v2 must still run at the end."""
    steps = documented_steps()
    assert [s[:2] for s in steps][:2] == [["docker-compose", "up"]] * 2, steps
    assert all("-T" in s for s in steps if s[1] == "exec"), "exec lines must work unattended"
    proj = Project(
        compose=compose_command(),
        name=f"fluster-doc-{uuid.uuid4().hex[:8]}",
        http_port=free_port(),
        status_port=free_port(),
        stats_port=free_port(),
    )
    load = Load(proj.http_port)
    try:
        proj.up("--scale", "web=1")
        wait_for(lambda: get(proj.http_port, timeout=2), timeout=90, what="web through HAProxy")
        load.port = proj.http_port  # `up` may have moved it to a fresh one
        load.start()
        for step in steps:
            command = step[1:]
            if command[0] == "up":
                command.insert(1, "--no-build")  # the images are built; never rebuild here
            # A person reads each answer before typing the next line: wait until the step
            # shows (new containers answer; a promotion waits for its instances by itself).
            proj(*command, timeout=180)
            if command[0] == "up":
                service = command[-1]
                started = proj.containers(service)
                wait_for(
                    lambda s=started: s <= load.seen(),  # type: ignore[misc]
                    timeout=90,
                    what=f"every {service} container answering after {' '.join(step)}",
                )
        assert len(proj.containers("web-v2")) == 2, "the v2 instances still run"
    finally:
        load.stop()
        proj.down()
    print(f"requests: {load.total()}, failed: {len(load.failures)}")
    assert load.failures == [], (
        f"{len(load.failures)} of {load.total()} failed: {load.failures[:10]}"
    )
