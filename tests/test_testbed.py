"""The harness itself: a port taken between free_port() and the bind is retried.

On a busy machine another process can bind the port `free_port()` just released before
etcd or HAProxy does. These tests take the port on purpose and check that the runner
starts again on a fresh one instead of failing the test that needed it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.etcd import Etcd
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
