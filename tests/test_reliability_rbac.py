"""R7: least privilege on etcd. Each identity can do its job and nothing else.

etcd runs with mutual TLS and `--client-cert-auth`; the test makes its own CA and
certificates (testbed/pki.py) and roles (tests/support/rbac.py). These checks go
through `Store`, the same client every component uses, so "allowed" here means the
component's real calls are allowed, and "forbidden" means the AuthError it would see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from fluster import keys
from fluster.catalog import Catalog
from fluster.lease import Lease
from fluster.records import Instance, ServiceSpec
from fluster.store import (
    AuthError,
    EtcdSettings,
    Store,
    StoreError,
    Unavailable,
    WatchRefused,
    open_store,
)
from testbed.pki import Pki
from tests.support.etcd import eventually, wait_for
from tests.support.rbac import (
    PREFIX,
    RELOADER_PASSWORD,
    RbacEtcd,
    assert_no_secrets,
    component_env,
    sidekick_identity,
)
from tests.support.sidekick import Sidekicks

pytestmark = pytest.mark.slow

WEB_1 = keys.instance_key(PREFIX, "web", "web-1")
API_1 = keys.instance_key(PREFIX, "api", "api-1")
INSTANCE = Instance(host="10.0.0.1", port=8080, version="v1").to_json()


async def forbidden(what: Callable[[], Awaitable[object]]) -> None:
    with pytest.raises(AuthError, match="permission denied"):
        await what()


async def watch_once(store: Store, prefix: str) -> None:
    async for _ in store.watch(prefix, 1, progress_every=0.5):
        return


async def test_sidekick_identity_writes_only_its_own_instances(etcd_rbac: RbacEtcd) -> None:
    etcd_rbac.etcd.ctl("put", keys.spec_key(PREFIX, "web"), ServiceSpec().to_json(), check=True)
    async with open_store(etcd_rbac.settings(sidekick_identity("web"))) as store:
        # Its whole job: lease, leased record, keepalive, read its spec, watch its service.
        lease = await store.grant(10)
        await store.put(WEB_1, INSTANCE, lease=lease)
        async for ttl in store.keepalive(lease, 0.2):
            assert ttl > 0
            break
        assert (await store.get(WEB_1))[1] is not None
        assert (await store.get(keys.spec_key(PREFIX, "web")))[1] is not None
        _, kvs = await store.get_prefix(keys.service_prefix(PREFIX, "web"))
        assert len(kvs) == 2
        await asyncio.wait_for(watch_once(store, keys.service_prefix(PREFIX, "web")), 5)
        await store.replace(WEB_1, INSTANCE, mod_revision=kvs[0].mod_revision or 0, lease=lease)

        # Not its job: its service's routing, other services, the reloaders, the whole tree.
        await forbidden(lambda: store.put(keys.spec_key(PREFIX, "web"), ServiceSpec().to_json()))
        await forbidden(lambda: store.delete(keys.spec_key(PREFIX, "web")))
        await forbidden(lambda: store.put(API_1, INSTANCE))
        await forbidden(lambda: store.get(API_1))
        await forbidden(lambda: store.get_prefix(keys.services_prefix(PREFIX)))
        await forbidden(lambda: store.put(keys.reloader_key(PREFIX, "edge-1"), "{}"))
        await forbidden(lambda: store.delete(keys.services_prefix(PREFIX), prefix=True))
        await forbidden(lambda: store.put("/elsewhere", "x"))
        # TLS private keys are for the edges only.
        await forbidden(lambda: store.get_prefix(keys.certs_prefix(PREFIX)))
        await forbidden(lambda: store.get(keys.cert_key(PREFIX, "web")))
        # A watch is refused at creation (WatchRefused), not left hanging.
        with pytest.raises((AuthError, WatchRefused), match="permission denied"):
            await asyncio.wait_for(watch_once(store, keys.services_prefix(PREFIX)), 5)

        await store.revoke(lease)  # needs write on every key under the lease: it has it
        assert (await store.get(WEB_1))[1] is None


async def test_reloader_identity_reads_services_and_writes_only_reloaders(
    etcd_rbac: RbacEtcd,
) -> None:
    async with (
        open_store(etcd_rbac.settings("reloader")) as reloader,
        open_store(etcd_rbac.settings(sidekick_identity("web"))) as sidekick,
    ):
        catalog = Catalog(reloader, PREFIX, progress_every=0.5)
        task = asyncio.create_task(catalog.run(lambda s: None))
        try:
            await eventually(lambda: catalog.revision > 0, what="catalog listed")
            await sidekick.put(WEB_1, INSTANCE)
            await eventually(lambda: "web" in catalog.snapshot.services, what="watch delivered")
        finally:
            task.cancel()

        lease = await reloader.grant(10)
        await reloader.put(
            keys.reloader_key(PREFIX, "edge-1"), '{"applied_revision":1}', lease=lease
        )
        _, kvs = await reloader.get_prefix(keys.reloaders_prefix(PREFIX))
        assert [kv.key for kv in kvs] == [keys.reloader_key(PREFIX, "edge-1")]

        await forbidden(lambda: reloader.put(WEB_1, INSTANCE))
        await forbidden(lambda: reloader.delete(WEB_1))
        await forbidden(lambda: reloader.put(keys.spec_key(PREFIX, "web"), "{}"))
        await forbidden(lambda: reloader.replace(API_1, INSTANCE, mod_revision=0))
        await forbidden(lambda: reloader.get("/elsewhere"))
        # It reads certificates (to serve them) but never writes one.
        etcd_rbac.etcd.ctl("put", "--", keys.cert_key(PREFIX, "web"), "pem", check=True)
        _, certs = await reloader.get_prefix(keys.certs_prefix(PREFIX))
        assert [kv.key for kv in certs] == [keys.cert_key(PREFIX, "web")]
        await forbidden(lambda: reloader.put(keys.cert_key(PREFIX, "web"), "x"))
        # (Not checked: etcd 3.4 lets any authenticated user compact; docs/OPERATIONS.md.)
        await reloader.revoke(lease)


async def test_a_lease_holder_refused_its_key_retries_and_lives_on(etcd_rbac: RbacEtcd) -> None:
    """The one retry policy: an AuthError is retried (slowly), never the end of a holder."""
    async with open_store(etcd_rbac.settings(sidekick_identity("web"))) as store:
        lease = Lease(store, 10, name="status")
        lease.set(keys.reloader_key(PREFIX, "edge-1"), "{}")  # not a sidekick's to write
        runner = asyncio.create_task(lease.run())
        try:
            await eventually(lambda: lease.errors >= 2, what="the refused write retried")
            assert not runner.done(), "an AuthError must not end the holder"
            assert lease.id is not None  # granting was allowed
        finally:
            runner.cancel()
            await lease.release()


async def test_the_json_gateway_wants_a_password_and_a_certificate_without_cn(
    etcd_rbac: RbacEtcd,
) -> None:
    """etcd's JSON gateway (`--etcd-transport http`, the small sidekick's) under
    --client-cert-auth: a certificate with a CN is refused with words that say what to
    do; one without a CN carries a password user, with that user's role."""
    with_cn = etcd_rbac.settings(
        "anyone", user="reloader-pw", password=RELOADER_PASSWORD, transport="http"
    )
    with pytest.raises(AuthError, match="client certificate without a CommonName"):
        async with open_store(with_cn):
            pass
    cert, key = etcd_rbac.pki.client_pair_without_cn("gateway")
    async with open_store(dataclasses.replace(with_cn, cert=cert, key=key)) as store:
        await store.get_prefix(keys.services_prefix(PREFIX))  # the reloader role reads
        await forbidden(lambda: store.put(WEB_1, INSTANCE))  # and writes no instance


async def test_password_identity_and_operator(etcd_rbac: RbacEtcd) -> None:
    """A password user is the same role behind a different credential (token wins over CN)."""
    with_password = etcd_rbac.settings("anyone", user="reloader-pw", password=RELOADER_PASSWORD)
    async with open_store(with_password) as store:
        await store.get_prefix(keys.services_prefix(PREFIX))
        await forbidden(lambda: store.put(WEB_1, INSTANCE))

    wrong = etcd_rbac.settings("anyone", user="reloader-pw", password="guess")
    with pytest.raises(AuthError, match="wrong user name or password"):
        async with open_store(wrong):
            pass

    async with open_store(etcd_rbac.settings("fluster-operator")) as operator:
        await operator.put(keys.spec_key(PREFIX, "web"), ServiceSpec().to_json())
        await operator.get_prefix(keys.reloaders_prefix(PREFIX))
        await forbidden(lambda: operator.put(keys.reloader_key(PREFIX, "edge-1"), "{}"))


async def test_unknown_and_unauthenticated_clients_are_refused(
    etcd_rbac: RbacEtcd, tmp_path: Path
) -> None:
    # A certificate from our CA whose CN is no etcd user: connected, but allowed nothing.
    async with open_store(etcd_rbac.settings("stranger")) as store:
        await forbidden(lambda: store.get(WEB_1))
        await forbidden(lambda: store.put(WEB_1, INSTANCE))

    async def refused(settings: EtcdSettings) -> None:
        async with open_store(settings) as store:
            with pytest.raises(Unavailable):
                await store.get(WEB_1)

    base = etcd_rbac.settings("reloader")
    # TLS without a client certificate: the handshake fails (--client-cert-auth).
    await refused(EtcdSettings(endpoints=base.endpoints, cacert=etcd_rbac.pki.ca, timeout=2.0))
    # Plaintext to a TLS port.
    await refused(EtcdSettings(endpoints=etcd_rbac.etcd.endpoint_list, timeout=2.0))
    # A certificate named "reloader" but signed by another CA.
    rogue = Pki(tmp_path / "rogue")
    await refused(
        EtcdSettings(
            endpoints=base.endpoints,
            cacert=etcd_rbac.pki.ca,
            cert=rogue.client_cert("reloader"),
            key=rogue.client_key("reloader"),
            timeout=2.0,
        )
    )
    # And the client side: a server whose certificate our CA did not sign is not trusted.
    await refused(
        EtcdSettings(
            endpoints=base.endpoints, cacert=rogue.ca, cert=base.cert, key=base.key, timeout=2.0
        )
    )


async def test_store_errors_never_carry_the_password(etcd_rbac: RbacEtcd) -> None:
    settings = etcd_rbac.settings("anyone", user="reloader-pw", password=RELOADER_PASSWORD)
    assert RELOADER_PASSWORD not in repr(settings)
    async with open_store(settings) as store:
        with pytest.raises(StoreError) as info:
            await store.put(WEB_1, INSTANCE)
    assert RELOADER_PASSWORD not in str(info.value)


# -- real processes with those identities ---------------------------------------------


def test_static_sidekicks_with_their_identities(etcd_rbac: RbacEtcd, tmp_path: Path) -> None:
    runner = Sidekicks(etcd_rbac.etcd, tmp_path)
    common = ("--node", "n1", "--ttl", "2", "--drain-seconds", "0.2", "--app-version", "v1")
    try:
        web = runner.start(
            "--service",
            "web",
            "--address",
            "127.0.0.1:8080",
            *common,
            **component_env(etcd_rbac, sidekick_identity("web")),
        )
        # The web identity asked to register api: refused by etcd, retried, never crashes.
        wrong = runner.start(
            "--service",
            "api",
            "--address",
            "127.0.0.1:8081",
            *common,
            **component_env(etcd_rbac, sidekick_identity("web")),
        )
        # A password identity (the reloader's: may not write instances) and a wrong password.
        pw = runner.start(
            "--service",
            "web",
            "--address",
            "127.0.0.1:8082",
            *common,
            **component_env(
                etcd_rbac, "anyone", ETCD_USER="reloader-pw", ETCD_PASSWORD=RELOADER_PASSWORD
            ),
        )
        bad_pw = runner.start(
            "--service",
            "web",
            "--address",
            "127.0.0.1:8083",
            *common,
            **component_env(etcd_rbac, "anyone", ETCD_USER="reloader-pw", ETCD_PASSWORD="nope"),
        )
        wait_for(lambda: "n1-127.0.0.1-8080" in runner.instances("web"), what="web registered")
        wait_for(
            lambda: "permission denied" in wrong.log() and "permission denied" in pw.log(),
            timeout=15,
            what="the refusals logged",
        )
        wait_for(lambda: "wrong user name or password" in bad_pw.log(), timeout=15)
        time.sleep(3)  # past one TTL: the good one keeps its lease, the others stay out
        assert set(runner.instances("web")) == {"n1-127.0.0.1-8080"}
        assert runner.instances("api") == {}
        for proc in (web, wrong, pw, bad_pw):
            assert proc.proc.poll() is None, proc.log()[-2000:]
        assert web.stop() == 0
        assert runner.instances("web") == {}  # drained and revoked with its own identity
    finally:
        runner.close()
    logs = {f"sidekick{i}": p.log() for i, p in enumerate(runner.procs)}
    assert_no_secrets(etcd_rbac, logs)


def test_fluster_cli_as_operator_and_as_a_sidekick(etcd_rbac: RbacEtcd) -> None:
    """The operator identity runs `fluster`; a sidekick's identity is refused (exit 1)."""

    def fluster(identity: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).with_name("fluster")), *args],
            env=etcd_rbac.env(identity),
            capture_output=True,
            text=True,
            timeout=30,
        )

    ok = fluster("fluster-operator", "spec", "web", "--host", "web.example.com")
    assert ok.returncode == 0, ok.stderr
    listed = fluster("fluster-operator", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["services"]["web"]["has_spec"]
    spec = fluster("fluster-operator", "spec", "web")
    assert json.loads(spec.stdout)["hosts"] == ["web.example.com"]

    refused = fluster(sidekick_identity("web"), "spec", "web", "--host", "evil.example.com")
    assert refused.returncode == 1
    assert "permission denied" in refused.stderr
    refused_ls = fluster(sidekick_identity("web"), "ls")
    assert refused_ls.returncode == 1
    assert "permission denied" in refused_ls.stderr
    assert_no_secrets(
        etcd_rbac,
        {"ok": ok.stdout + ok.stderr, "refused": refused.stderr, "ls": listed.stdout},
    )


def test_the_deployer_identity_claims_apps_and_reads_no_certificate(
    etcd_rbac: RbacEtcd, tmp_path: Path
) -> None:
    """`fluster app create` as the deploy host's identity (docs/OPERATIONS.md): the config
    and the service's owner are written; a second app claiming the service is refused
    naming the owner; a sidekick's identity can write neither, nor can the deployer read
    the edges' TLS keys."""

    def fluster(identity: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).with_name("fluster")), *args],
            env={**etcd_rbac.env(identity), "FLUSTER_REPOS": str(tmp_path / "repos")},
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = fluster("fluster-deployer", "app", "create", "shop", "--service", "web")
    assert made.returncode == 0, made.stderr
    taken = fluster("fluster-deployer", "app", "create", "intruder", "--service", "web")
    assert taken.returncode != 0 and "service web belongs to app shop" in taken.stderr
    owner = etcd_rbac.etcd.ctl("get", "--print-value-only", keys.owner_key(PREFIX, "web"))
    assert owner.stdout.strip() == "shop", owner.stderr
    denied = fluster(sidekick_identity("web"), "app", "create", "x", "--service", "web")
    assert denied.returncode != 0 and "permission denied" in denied.stderr, denied.stderr
    certs = fluster("fluster-deployer", "cert", "ls")
    assert certs.returncode != 0 and "permission denied" in certs.stderr, certs.stderr
