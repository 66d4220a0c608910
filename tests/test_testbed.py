"""The harness itself: a port taken between free_port() and the bind is retried.

On a busy machine another process can bind the port `free_port()` just released before
etcd, HAProxy, a bench pipeline, a test app on the host network, docker-registry, sshd or
Pebble does. These tests take
the port on purpose and check that the runner starts again on a fresh one instead of
failing the test (or the bench row) that needed it.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import scenarios
from bench.pipelines import Ours
from testbed.etcd import Etcd
from testbed.ports import PortsLost, free_port
from tests.support import docker, sshd
from tests.support.docker import Engine
from tests.support.haproxy import ReloaderProcess
from tests.support.pebble import Pebble
from tests.support.registry import Registry
from tests.support.sshd import Sshd


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_etcd_starts_again_on_fresh_ports_when_one_is_taken(
    tmp_path: Path, taken_port: int
) -> None:
    cluster = Etcd(tmp_path / "etcd")
    cluster.members[0].client_port = taken_port
    try:
        cluster.start()
        assert cluster.members[0].client_port != taken_port
        assert b"address already in use" in cluster.members[0].log_path.read_bytes()
        cluster.put("/k", "v")
    finally:
        cluster.stop()


def test_the_reloader_starts_again_on_fresh_ports_when_one_is_taken(
    etcd: Etcd, tmp_path: Path, taken_port: int
) -> None:
    reloader = ReloaderProcess(etcd, tmp_path / "reloader")
    reloader.http_port = taken_port
    try:
        reloader.start()
        assert reloader.http_port != taken_port
        assert "address already in use" in reloader.log().lower()
    finally:
        reloader.stop()


def test_the_reloaders_https_port_is_fresh_too_when_it_is_taken(
    etcd: Etcd, tmp_path: Path, taken_port: int
) -> None:
    reloader = ReloaderProcess(etcd, tmp_path / "reloader", https=True)
    reloader.https_port = taken_port
    try:
        reloader.start()
        assert reloader.https_port not in (None, taken_port)
        assert "address already in use" in reloader.log().lower()
    finally:
        reloader.stop()


def test_the_registry_starts_again_on_a_fresh_port_when_its_is_taken(
    tmp_path: Path, taken_port: int
) -> None:
    registry = Registry(tmp_path / "registry")
    registry.port = taken_port
    try:
        registry.start()
        assert registry.port != taken_port
        assert "address already in use" in registry.log()
        with urllib.request.urlopen(f"http://{registry.address}/v2/", timeout=5) as resp:
            assert resp.status == 200  # it answers on its new port
    finally:
        registry.stop()


def test_sshd_starts_again_on_a_fresh_port_when_its_is_taken(
    tmp_path: Path, taken_port: int
) -> None:
    server = Sshd(tmp_path / "sshd")
    server.port = taken_port
    try:
        server.start("/bin/true")
        assert server.port != taken_port
        assert "Address already in use" in server.log()
        known_hosts = (tmp_path / "sshd" / "known_hosts").read_text()
        assert known_hosts.startswith(f"[127.0.0.1]:{server.port} ")
    finally:
        server.stop()


def test_sshd_gives_up_naming_its_log_when_every_port_is_taken(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sshd, "free_port", lambda: taken_port)
    server = Sshd(tmp_path / "sshd")
    try:
        with pytest.raises(PortsLost, match=r"sshd \(log: .*sshd\.log\) lost a port .* 3 times"):
            server.start("/bin/true")
    finally:
        server.stop()


def test_pebble_starts_again_when_its_dns_stub_lost_its_port(
    tmp_path: Path, taken_port: int
) -> None:
    """pebble-challtestsrv keeps running without the DNS port it could not bind: only its
    log tells, and that is enough to start both again."""
    pebble = Pebble(tmp_path / "pebble", http_port=free_port())
    pebble.dns_port = taken_port
    try:
        pebble.start()
        assert pebble.dns_port != taken_port
        challtestsrv_log = (tmp_path / "pebble" / "challtestsrv.log").read_text()
        assert "address already in use" in challtestsrv_log
        assert all(proc.poll() is None for proc in pebble.procs)
    finally:
        pebble.stop()


def test_a_bench_pipeline_starts_again_on_fresh_ports_when_one_is_taken(
    etcd: Etcd, tmp_path: Path, taken_port: int
) -> None:
    pipeline = Ours(tmp_path, etcd.endpoints, "/bench-ports", taken_port, free_port())
    try:
        asyncio.run(scenarios.start(pipeline))
        assert pipeline.alive()
        assert pipeline.http_port != taken_port
        assert "address already in use" in pipeline.log.read_text().lower()
    finally:
        pipeline.stop()


@pytest.mark.docker
def test_a_host_network_app_starts_again_on_a_fresh_port_when_its_is_taken(
    apps: Engine, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([taken_port])
    monkeypatch.setattr(docker, "free_port", lambda: next(ports, None) or free_port())
    cid, port = apps.run_host_app(lambda port: {"test.port": str(port)})
    assert port != taken_port
    assert apps.inspect(cid)["Config"]["Labels"]["test.port"] == str(port)  # type: ignore[index]
    assert len(apps.containers) == 1, "the container that lost its port is removed"
