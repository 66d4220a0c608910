"""Automatic certificates end to end: real reloaders and HAProxy against Pebble, a real
ACME server, validating HTTP-01 through HAProxy. Everything on loopback (see
tests/support/pebble.py for the DNS stub that makes every name 127.0.0.1).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support.certs import pem, s_client, s_client_subject
from tests.support.etcd import Etcd, free_port, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess

SPEC = "/fluster/services/{}/spec"
KEY = "/fluster/services/{}/instances/{}"
CERT = "/fluster/certs/{}"


@pytest.fixture
def edges(etcd: Etcd, tmp_path: Path) -> Iterator[list[ReloaderProcess]]:
    started: list[ReloaderProcess] = []
    yield started
    for edge in started:
        edge.stop()


def start_edges(
    etcd: Etcd, tmp_path: Path, started: list[ReloaderProcess], count: int
) -> tuple[list[tuple[ReloaderProcess, int]], object]:
    """`count` edges; Pebble validates through the first one's HTTP port. Call it before
    any host wants a certificate: an edge that lost a port starts again on fresh ones,
    and Pebble follows the first edge's only once they are all up."""
    from tests.support.pebble import Pebble

    edges = [ReloaderProcess(etcd, tmp_path / f"edge{i}", https=True) for i in range(count)]
    pebble = Pebble(tmp_path / "pebble", edges[0].http_port).start()
    for edge in edges:
        edge.args = (
            *edge.args,
            "--acme-directory",
            pebble.directory,
            "--acme-ca-file",
            str(pebble.ca_file),
            "--acme-email",
            "ops@example.test",
        )
        started.append(edge)
        edge.start()
    pebble.validate_through(edges[0].http_port)
    return [(edge, edge.https_port or 0) for edge in edges], pebble


def test_two_edges_one_order_then_served_and_renewed(
    etcd: Etcd, tmp_path: Path, edges: list[ReloaderProcess]
) -> None:
    web = HttpBackend("web")
    pebble = None
    try:
        started, pebble = start_edges(etcd, tmp_path, edges, 2)
        (a, a_https), (b, b_https) = started
        etcd.put(SPEC.format("web"), json.dumps({"hosts": ["web.test"], "https": "redirect"}))
        etcd.put(KEY.format("web", "a"), web.json())

        def issued() -> bool:
            out = etcd.ctl("get", CERT.format("web.test"), "-w", "json").stdout
            return '"kvs"' in out

        wait_for(issued, timeout=90, what=f"a certificate from pebble (logs: {tmp_path})")
        # one order for two edges: the record was written once, by one of them
        meta = json.loads(etcd.ctl("get", CERT.format("web.test"), "-w", "json").stdout)
        assert meta["kvs"][0]["version"] == 1
        orders = [e.status()["acme_orders"] for e in (a, b)]
        assert sorted(orders) == [0, 1], orders
        # both edges serve it, and route HTTPS; HTTP redirects
        for port in (a_https, b_https):
            wait_for(
                lambda port=port: "Pebble" in s_client(port, "web.test"),
                what="pebble's certificate served",
            )
        assert a.get("web.test")[0] == 308

        # renewal: a certificate of the host that has used 2/3 of its life is replaced
        now = datetime.now(UTC)
        old = pem("web.test", days=0.5, not_before=now - timedelta(days=2))
        etcd.put(CERT.format("web.test"), old)
        wait_for(
            lambda: sum(e.status()["acme_orders"] for e in (a, b)) == 2,
            timeout=90,
            what=f"the aging certificate renewed (logs: {tmp_path})",
        )
        wait_for(
            lambda: "Pebble" in s_client(b_https, "web.test"),
            what="the renewed certificate served",
        )
        status = a.status()
        assert status["acme"] is True and status["acme_failures"] == 0, status["acme_last_error"]
        code, metrics = a.http_get("/metrics")
        assert code == 200 and "reloader_acme_orders_total" in metrics
    finally:
        web.stop()
        if pebble is not None:
            pebble.stop()  # type: ignore[attr-defined]


def test_ca_unreachable_is_retried_visibly_and_nothing_breaks(
    etcd: Etcd, tmp_path: Path, edges: list[ReloaderProcess]
) -> None:
    web = HttpBackend("web")
    try:
        etcd.put(SPEC.format("web"), json.dumps({"hosts": ["web.test"], "https": "on"}))
        etcd.put(KEY.format("web", "a"), web.json())
        edge = ReloaderProcess(
            etcd,
            tmp_path / "edge",
            "--acme-directory",
            f"https://127.0.0.1:{free_port()}/dir",  # nothing listens there
            https=True,
        )
        edges.append(edge)
        edge.start()
        assert edge.https_port is not None
        https = edge.https_port
        wait_for(lambda: edge.status()["acme_failures"] >= 1, timeout=30, what="a failed order")
        status = edge.status()
        assert "web.test" in status["acme_retry_at"], status
        assert "web.test" in status["acme_last_error"]
        assert "reloader_acme_pending_hosts 1.0" in edge.http_get("/metrics")[1]
        # the edge keeps routing, over HTTP and HTTPS (with its default certificate)
        assert edge.get("web.test") == (200, web.ident)
        assert "fluster-default.invalid" in s_client_subject(https, "web.test")
    finally:
        web.stop()
