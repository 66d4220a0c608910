"""A record can only ever affect its own service, against a running reloader.

Each break of issue 11 is written to etcd while a request loop runs against a healthy
service: the loop must see no failed request, the bad service (or instance) must be in
/status `skipped_services` with its reason, and a service added afterwards must still be
routed. A reloader started fresh beside every bad record at once must serve every good
service.

A name that does not resolve is only looked up inside a network namespace with nothing
but loopback (`unshare -n`): the test re-runs itself there, with its own etcd, reloader
and backends, so no DNS query can leave the machine.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fluster.cli import main as fluster_main
from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess

Start = Callable[..., ReloaderProcess]
Backends = Callable[..., list[HttpBackend]]
KEY = "/fluster/services/{}/instances/{}"
SPEC = "/fluster/services/{}/spec"
IN_NETNS = os.environ.get("FLUSTER_TEST_IN_NETNS") == "1"


class Loop:
    """Requests to one Host through HAProxy, one after another, until stopped."""

    def __init__(self, reloader: ReloaderProcess, host: str) -> None:
        self.reloader, self.host = reloader, host
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 180  # bounded whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.reloader.http_port, timeout=5)
            try:
                conn.request("GET", "/", headers={"Host": self.host})
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"HTTP {resp.status}")
            except OSError as exc:
                self.failed.append(repr(exc))
            finally:
                conn.close()

    @contextmanager
    def running(self) -> Iterator[Loop]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)


def tcp_get(port: int) -> str:
    """An HTTP/1.0 request through a TCP frontend: the whole answer, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def skipped(reloader: ReloaderProcess) -> list[dict[str, str]]:
    return list(reloader.status()["skipped_services"])


def wait_skipped(reloader: ReloaderProcess, service: str, kind: str, instance: str | None = None):  # type: ignore[no-untyped-def]
    def found() -> dict[str, str] | None:
        for skip in skipped(reloader):
            if (skip["service"], skip["kind"], skip.get("instance")) == (service, kind, instance):
                return skip
        return None

    return wait_for(
        found, timeout=20, what=f"{service}/{instance} skipped ({kind}); log: {reloader.log_path}"
    )


@contextmanager
def healthy_web(etcd: Etcd, reloader: ReloaderProcess, backends: Backends) -> Iterator[Loop]:
    """web served by two instances, under a request loop that must never fail."""
    a, b = backends(2, prefix="web")
    etcd.put(KEY.format("web", "a"), a.json())
    etcd.put(KEY.format("web", "b"), b.json())
    reloader.wait_served("web.localhost", {a.ident, b.ident})
    loop = Loop(reloader, "web.localhost")
    with loop.running():
        yield loop
        # Enough requests to mean something, and some after the last change, however
        # slow a busy machine makes them.
        after = loop.ok
        wait_for(lambda: loop.ok >= max(20, after + 5), timeout=30, what="requests made")
    assert loop.failed == [], f"{len(loop.failed)} failed of {loop.ok}: {loop.failed[:5]}"


def still_routes_a_new_service(etcd: Etcd, reloader: ReloaderProcess, backends: Backends) -> None:
    (fresh,) = backends(1, prefix="fresh")
    etcd.put(KEY.format("fresh", "x"), fresh.json())
    reloader.wait_served("fresh.localhost", {fresh.ident}, timeout=20)


def test_a_tcp_port_in_use_leaves_out_only_that_service(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    reloader = start_reloader()
    (db,) = backends(1, prefix="db")
    with socket.socket() as busy, healthy_web(etcd, reloader, backends):
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        etcd.put(SPEC.format("db"), json.dumps({"mode": "tcp", "port": port}))
        etcd.put(KEY.format("db", "x"), db.json())
        # The edge's own status port, asked for by another TCP service.
        etcd.put(SPEC.format("stat"), json.dumps({"mode": "tcp", "port": reloader.status_port}))
        etcd.put(KEY.format("stat", "x"), db.json())
        reason = wait_skipped(reloader, "db", "port")["reason"]
        assert f"port {port}" in reason and "in use" in reason
        assert "status page" in wait_skipped(reloader, "stat", "port")["reason"]
        still_routes_a_new_service(etcd, reloader, backends)
        assert reloader.status()["failures"]["reload"] == 0

    # Once the port is free, the service comes in without any record changing.
    wait_for(
        lambda: db.ident in tcp_get(port),
        timeout=30,
        what=f"db served on its port; log: {reloader.log_path}",
    )
    _, metrics = reloader.http_get("/metrics")
    assert 'reloader_skips_total{kind="port"}' in metrics
    assert "left out of the config" in reloader.log()


def test_a_reloader_taking_over_its_haproxy_keeps_its_tcp_ports(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    """The HAProxy a SIGKILLed reloader left running holds the TCP ports of its config:
    the next reloader must not take them for another process's and leave them out."""
    (db,) = backends(1, prefix="db")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    etcd.put(SPEC.format("db"), json.dumps({"mode": "tcp", "port": port}))
    etcd.put(KEY.format("db", "x"), db.json())
    reloader = start_reloader()
    wait_for(lambda: "frontend tcp_db" in reloader.config, what="db routed")
    assert reloader.proc is not None
    reloader.proc.kill()
    reloader.proc.wait(10)
    reloader.start()
    assert db.ident in tcp_get(port)
    assert "left out of the config" not in reloader.log(), reloader.log_path
    assert skipped(reloader) == []


def test_two_tcp_services_on_one_port_the_older_spec_keeps_it(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    reloader = start_reloader()
    old, new = backends(2, prefix="tcp")
    with healthy_web(etcd, reloader, backends):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        etcd.put(SPEC.format("zzz-old"), json.dumps({"mode": "tcp", "port": port}))
        etcd.put(KEY.format("zzz-old", "x"), old.json())
        wait_for(lambda: "frontend tcp_zzz-old" in reloader.config, what="older served")
        etcd.put(SPEC.format("aaa-new"), json.dumps({"mode": "tcp", "port": port}))
        etcd.put(KEY.format("aaa-new", "x"), new.json())
        assert "service zzz-old" in wait_skipped(reloader, "aaa-new", "port")["reason"]
        still_routes_a_new_service(etcd, reloader, backends)
    assert "frontend tcp_aaa-new" not in reloader.config


def test_a_later_spec_cannot_take_another_services_host(
    etcd: Etcd, start_reloader: Start, backends: Backends, capsys: pytest.CaptureFixture[str]
) -> None:
    reloader = start_reloader()
    (thief,) = backends(1, prefix="thief")
    with healthy_web(etcd, reloader, backends) as loop:
        etcd.put(SPEC.format("aaa"), json.dumps({"hosts": ["web.localhost"]}))
        etcd.put(KEY.format("aaa", "x"), thief.json())
        reason = wait_skipped(reloader, "aaa", "host")["reason"]
        assert "web.localhost belongs to service web" in reason
        still_routes_a_new_service(etcd, reloader, backends)
    assert loop.ok and reloader.get("web.localhost")[1].startswith("web")
    # `fluster spec` refuses the same claim, naming the owner, and writes nothing.
    env = {"ETCD_ENDPOINTS": etcd.endpoints}
    assert fluster_main(["spec", "other", "--host", "web.localhost"], env) != 0
    assert "belongs to service web" in capsys.readouterr().err
    assert etcd.ctl("get", SPEC.format("other")).stdout == ""
    assert fluster_main(["spec", "other", "--host", "other.example"], env) == 0


def test_instances_at_the_edge_itself_or_metadata_addresses_are_never_rendered(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    reloader = start_reloader()
    (good,) = backends(1, prefix="api")
    etcd_port = int(etcd.endpoints.split(",")[0].rsplit(":", 1)[1])
    bad = {
        "loop": ("127.0.0.1", reloader.http_port),
        "status": ("127.0.0.1", reloader.status_port),
        "etcd": ("127.0.0.1", etcd_port),
        "any": ("0.0.0.0", 80),
        "metadata": ("169.254.169.254", 80),
    }
    with healthy_web(etcd, reloader, backends):
        etcd.put(KEY.format("api", "good"), good.json())
        for name, (host, port) in bad.items():
            etcd.put(KEY.format("api", name), json.dumps({"host": host, "port": port}))
        for name in bad:
            wait_skipped(reloader, "api", "target", name)
        reloader.wait_served("api.localhost", {good.ident})
        still_routes_a_new_service(etcd, reloader, backends)
    config = reloader.config
    assert "169.254.169.254" not in config and "0.0.0.0" not in config
    for name, (host, port) in bad.items():
        assert f" {host}:{port} weight" not in config, name
    assert reloader.status()["services"]["api"]["routed"] == ["good"]


def test_an_empty_active_version_keeps_serving_the_most_recent_one(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    reloader = start_reloader()
    v1 = backends(2, prefix="v1")
    for n, app in enumerate(v1):
        etcd.put(KEY.format("shop", f"v1-{n}"), app.json(version="v1"))
    reloader.wait_served("shop.localhost", {a.ident for a in v1})
    etcd.put(SPEC.format("shop"), json.dumps({"active_version": "v2"}))  # v2: none up
    wait_for(
        lambda: reloader.status()["services"]["shop"]["fallback_version"] == "v1",
        what="fallback to v1",
    )
    assert reloader.served_by("shop.localhost", 8) == {a.ident for a in v1}
    status = reloader.status()
    assert status["fallback_services"] == {"shop": "v1"}
    assert "has no instance up" in status["services"]["shop"]["warning"]
    assert (
        'reloader_service_fallback{service="shop",serving_version="v1"} 1.0'
        in (reloader.http_get("/metrics")[1])
    )
    assert reloader.log().count("serving another version until it has") == 1
    # Strict: exactly as the spec says, even to nothing.
    etcd.put(SPEC.format("shop"), json.dumps({"active_version": "v2", "strict_active": True}))
    wait_for(lambda: reloader.get("shop.localhost")[0] == 503, what="strict routes nothing")
    # v2 arrives: it serves, the fallback is over.
    etcd.put(SPEC.format("shop"), json.dumps({"active_version": "v2"}))
    (v2,) = backends(1, prefix="v2")
    etcd.put(KEY.format("shop", "v2-0"), v2.json(version="v2"))
    reloader.wait_served("shop.localhost", {v2.ident})
    assert reloader.status()["fallback_services"] == {}


# -- names that do not resolve: only inside a loopback-only network namespace -----------


def _rerun_in_netns(nodeid: str) -> None:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare (util-linux) is needed to keep DNS queries on this machine")
    script = (
        "ip link set lo up && exec "
        f"{sys.executable} -m pytest -q -x -p no:cacheprovider {nodeid!r} 2>&1"
    )
    root = Path(__file__).resolve().parent.parent
    # As root a new network namespace is enough; elsewhere a user namespace maps us to
    # root inside it (where the kernel allows unprivileged user namespaces).
    flags = ["--net"]
    if subprocess.run([unshare, *flags, "true"], capture_output=True).returncode != 0:
        flags = ["--map-root-user", "--net"]
    result = subprocess.run(
        [unshare, *flags, "--", "sh", "-c", script],
        cwd=root,
        env={**os.environ, "FLUSTER_TEST_IN_NETNS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-3000:]


def _in_netns(request: pytest.FixtureRequest) -> tuple[Etcd, Start, Backends] | None:
    if not IN_NETNS:
        _rerun_in_netns(request.node.nodeid)
        return None
    return (
        request.getfixturevalue("etcd"),
        request.getfixturevalue("start_reloader"),
        request.getfixturevalue("backends"),
    )


def test_an_unresolvable_instance_name_leaves_out_that_instance(
    request: pytest.FixtureRequest,
) -> None:
    parts = _in_netns(request)
    if parts is None:
        return
    etcd, start_reloader, backends = parts
    reloader = start_reloader()
    with healthy_web(etcd, reloader, backends):
        etcd.put(KEY.format("web", "c"), json.dumps({"host": "nosuch.invalid", "port": 80}))
        etcd.put(KEY.format("api", "y"), "nosuch.invalid:8080")
        reason = wait_skipped(reloader, "web", "dns", "c")["reason"]
        assert "nosuch.invalid does not resolve" in reason
        wait_skipped(reloader, "api", "dns", "y")
        still_routes_a_new_service(etcd, reloader, backends)
    assert "nosuch" not in reloader.config
    assert reloader.status()["failures"]["rejected"] == 0


BAD_RECORDS: dict[str, Any] = {
    SPEC.format("db"): {"mode": "tcp", "port": None},  # the busy port, filled in below
    KEY.format("db", "x"): None,
    KEY.format("dns", "x"): {"host": "nosuch.invalid", "port": 80},
    SPEC.format("thief"): {"hosts": ["web.localhost"]},
    KEY.format("thief", "x"): None,
    KEY.format("self", "loop"): {"host": "127.0.0.1", "port": None},  # the HTTP port
    KEY.format("self", "meta"): {"host": "169.254.169.254", "port": 80},
    KEY.format("self", "any"): {"host": "0.0.0.0", "port": 80},
}


def test_a_fresh_reloader_beside_every_bad_record_serves_every_good_service(
    request: pytest.FixtureRequest,
) -> None:
    parts = _in_netns(request)
    if parts is None:
        return
    etcd, _, backends = parts
    web, api, other = backends(3)
    etcd.put(KEY.format("web", "a"), web.json())
    etcd.put(KEY.format("api", "a"), api.json())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        reloader = ReloaderProcess(etcd, Path(str(request.getfixturevalue("tmp_path"))) / "fresh")
        for key, value in BAD_RECORDS.items():
            value = dict(value) if value else json.loads(other.json())
            if value.get("port") is None:
                value["port"] = busy.getsockname()[1] if "/db/" in key else reloader.http_port
            etcd.put(key, json.dumps(value))
        try:
            reloader.start()
            reloader.wait_served("web.localhost", {web.ident})
            reloader.wait_served("api.localhost", {api.ident})
            kinds = {(s["service"], s["kind"]) for s in skipped(reloader)}
            assert kinds >= {
                ("db", "port"),
                ("dns", "dns"),
                ("thief", "host"),
                ("self", "target"),
            }, kinds
            still_routes_a_new_service(etcd, reloader, backends)
        finally:
            reloader.stop()
