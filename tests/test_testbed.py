"""The harness itself: a port taken between free_port() and the bind is retried.

On a busy machine another process can bind the port `free_port()` just released before
etcd, HAProxy, a bench pipeline or a test app on the host network does. These tests take
the port on purpose and check that the runner starts again on a fresh one instead of
failing the test (or the bench row) that needed it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import scenarios
from bench.pipelines import Ours
from testbed.etcd import Etcd, free_port
from tests.support import docker
from tests.support.docker import Engine
from tests.support.haproxy import ReloaderProcess


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
