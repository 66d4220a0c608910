"""The store and catalog when etcd misbehaves: lost quorum, a frozen member, auth, TLS.

All against real etcd processes: a 3-member cluster whose members are stopped or
paused with SIGSTOP, and single members with auth or mutual TLS enabled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fluster.catalog import Catalog
from fluster.store import AuthError, EtcdSettings, StoreError, Unavailable, open_store
from testbed.pki import Pki
from tests.support.etcd import Etcd, Member, eventually

PREFIX = "/fluster"
pytestmark = pytest.mark.slow


def ikey(name: str) -> str:
    return f"{PREFIX}/services/web/instances/{name}"


@pytest.fixture
async def catalog3(etcd3: Etcd) -> AsyncIterator[Catalog]:
    async with open_store(EtcdSettings(endpoints=etcd3.endpoint_list, timeout=2.0)) as store:
        catalog = Catalog(store, PREFIX, progress_every=1.0)
        task = asyncio.create_task(catalog.run(lambda s: None))
        await eventually(lambda: catalog.revision > 0)
        yield catalog
        task.cancel()


def watch_streams(member: Member) -> int:
    """How many watch streams a member serves, from its own /metrics."""
    url = f"http://{member.endpoint}/metrics"
    with urllib.request.urlopen(url, timeout=2) as reply:
        text = reply.read().decode()
    match = re.search(r"^etcd_debugging_mvcc_watch_stream_total (\d+)", text, re.M)
    return int(match.group(1)) if match else 0


async def test_quorum_loss_interrupts_the_watch_within_seconds(
    etcd3: Etcd, catalog3: Catalog
) -> None:
    before = catalog3.reconnects
    etcd3.members[1].stop()
    etcd3.members[2].stop()
    started = time.monotonic()
    # hasleader: the surviving member cancels the watch once it knows it has no leader.
    await eventually(lambda: catalog3.reconnects > before, timeout=15, what="watch interrupted")
    assert time.monotonic() - started < 15

    etcd3.restart(etcd3.members[1])
    etcd3.restart(etcd3.members[2])
    etcd3.wait_healthy()
    etcd3.put(ikey("after"), "10.0.0.1:80")
    await eventually(lambda: "web" in catalog3.snapshot.services, timeout=20, what="resumed")


async def test_frozen_member_is_noticed_and_a_live_one_takes_over(
    etcd3: Etcd, catalog3: Catalog
) -> None:
    host = await eventually(
        lambda: next((m for m in etcd3.members if watch_streams(m) > 0), None),
        what="the member serving the watch",
    )
    host.pause()
    try:
        started = time.monotonic()
        live = ",".join(m.endpoint for m in etcd3.members if m is not host)
        await eventually(
            lambda: etcd3.ctl("endpoint", "health", endpoints=live).returncode == 0, timeout=10
        )
        etcd3.ctl("put", ikey("while-frozen"), "10.0.0.2:80", endpoints=live)
        await eventually(
            lambda: "web" in catalog3.snapshot.services, timeout=20, what="change via live member"
        )
        assert time.monotonic() - started < 20
    finally:
        host.resume()


@pytest.fixture(params=["grpc", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    """Each store check below runs over both transports (fluster/store.py)."""
    return str(request.param)


async def test_store_calls_fail_fast_without_quorum(etcd3: Etcd, transport: Any) -> None:
    settings = EtcdSettings(endpoints=etcd3.endpoint_list, timeout=1.0, transport=transport)
    async with open_store(settings) as store:
        await store.put("/x", "1")
        etcd3.members[0].stop()
        etcd3.members[1].stop()
        started = time.monotonic()
        with pytest.raises(Unavailable):
            await store.put("/x", "2")
        assert time.monotonic() - started < 5


# -- auth ------------------------------------------------------------------------------


@pytest.fixture
def etcd_auth(etcd: Etcd) -> Etcd:
    for args in (
        ("user", "add", "root:rootpw"),
        ("role", "add", "reader"),
        ("role", "grant-permission", "--prefix=true", "reader", "read", "/other/"),
        ("user", "add", "alice:alicepw"),
        ("user", "grant-role", "alice", "reader"),
        ("auth", "enable"),
    ):
        etcd.ctl(*args, check=True)
    return etcd


async def test_wrong_password_is_a_clear_error(etcd_auth: Etcd, transport: Any) -> None:
    settings = EtcdSettings(
        endpoints=etcd_auth.endpoint_list, user="alice", password="nope", transport=transport
    )
    with pytest.raises(AuthError, match="wrong user name or password"):
        async with open_store(settings):
            pass


async def test_permission_denied_is_a_clear_error_for_reads_and_watches(
    etcd_auth: Etcd, transport: Any
) -> None:
    settings = EtcdSettings(
        endpoints=etcd_auth.endpoint_list, user="alice", password="alicepw", transport=transport
    )
    async with open_store(settings) as store:
        await store.get_prefix("/other/")  # allowed
        with pytest.raises(AuthError, match="permission denied"):
            await store.get_prefix(f"{PREFIX}/services/")
        with pytest.raises(AuthError, match="permission denied"):
            await store.put("/other/x", "1")

        async def watch() -> None:
            async for _ in store.watch(f"{PREFIX}/services/", 1):
                pass

        with pytest.raises(StoreError):  # refused, not a hang
            await asyncio.wait_for(watch(), 10)


async def test_expired_token_is_renewed(etcd_auth: Etcd, transport: Any) -> None:
    settings = EtcdSettings(
        endpoints=etcd_auth.endpoint_list, user="alice", password="alicepw", transport=transport
    )
    async with open_store(settings) as store:
        store._token = "stale.token.from-before"  # as if etcd had expired it
        await store.get_prefix("/other/")
        assert store._token != "stale.token.from-before"


# -- mutual TLS ------------------------------------------------------------------------


@pytest.fixture
def etcd_tls(tmp_path: Path) -> AsyncIterator[Etcd]:
    cluster = Etcd(tmp_path / "etcd", pki=Pki(tmp_path / "pki")).start()
    yield cluster  # type: ignore[misc]
    cluster.stop()


async def test_mutual_tls(etcd_tls: Etcd, transport: Any) -> None:
    pki = etcd_tls.pki
    assert pki is not None
    good = EtcdSettings(
        endpoints=tuple(f"https://{e}" for e in etcd_tls.endpoint_list),
        cacert=pki.ca,
        cert=pki.client_cert("reloader"),
        key=pki.client_key("reloader"),
        timeout=2.0,
        transport=transport,
    )
    async with open_store(good) as store:
        await store.put("/tls", "ok")
        assert (await store.get("/tls"))[1] is not None

    no_cert = dataclasses.replace(good, cert=None, key=None)
    async with open_store(no_cert) as store:
        with pytest.raises(Unavailable):
            await store.get("/tls")

    plaintext = EtcdSettings(endpoints=etcd_tls.endpoint_list, timeout=2.0, transport=transport)
    async with open_store(plaintext) as store:
        with pytest.raises(Unavailable):
            await store.get("/tls")
