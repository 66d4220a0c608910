"""The deploy lock on a real etcd: one deploy per app, the second waits and says for whom,
and a deploy whose process died (SIGKILL: nothing revokes anything) frees the lock when
its lease runs out."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest

from deployer.engine import DeployError
from deployer.lock import TTL, deploy_lock
from fluster import keys
from fluster.store import EtcdSettings, open_store
from tests.support.etcd import Etcd

HOLDER = """
import asyncio, sys
from deployer.lock import deploy_lock
from fluster.store import EtcdSettings, open_store

async def main():
    async with open_store(EtcdSettings(endpoints=(sys.argv[1],))) as store:
        async with deploy_lock(store, "/fluster", "web", "dead-deploy", wait_limit=5, say=print):
            print("holding", flush=True)
            await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_second_deploy_waits_for_the_first(etcd: Etcd) -> None:
    said: list[str] = []
    asked = asyncio.Event()

    def say(text: str) -> None:
        said.append(text)
        asked.set()

    async with open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as store:
        holding, first_done = asyncio.Event(), asyncio.Event()
        order: list[str] = []

        async def first() -> None:
            async with deploy_lock(store, "/fluster", "web", "deploy-1", wait_limit=5, say=say):
                holding.set()
                await first_done.wait()

        async def second() -> None:
            async with deploy_lock(store, "/fluster", "web", "deploy-2", wait_limit=5, say=say):
                order.append("second")

        task = asyncio.create_task(first())
        await asyncio.wait_for(holding.wait(), 10)
        waiting = asyncio.create_task(second())
        await asyncio.wait_for(asked.wait(), 10)
        assert said == ["waiting for deploy deploy-1 to finish"]
        assert order == []
        order.append("first done")
        first_done.set()
        await asyncio.wait_for(asyncio.gather(task, waiting), 10)
        assert order == ["first done", "second"]
        # Released on exit: the key is gone at once, not after a TTL.
        assert (await store.get(keys.app_lock_key("/fluster", "web")))[1] is None


async def test_a_lock_held_too_long_is_a_clear_error(etcd: Etcd) -> None:
    async with (
        open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as store,
        deploy_lock(store, "/fluster", "web", "deploy-1", wait_limit=5, say=print),
    ):
        with pytest.raises(DeployError, match="deploy deploy-1 of web still running"):
            async with deploy_lock(store, "/fluster", "web", "deploy-2", wait_limit=0.3, say=print):
                pytest.fail("took a lock someone holds")


@pytest.mark.slow
async def test_a_dead_deploy_frees_the_lock_with_its_lease(etcd: Etcd) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, etcd.endpoints, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while (line := await proc.stdout.readline()).strip() != b"holding":
                # the holder's own log lines; at its end it died (its stderr is above)
                assert line, f"the lock holder exited ({await proc.wait()}) before holding"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        killed = time.monotonic()
        said: list[str] = []
        async with (
            open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as store,
            deploy_lock(store, "/fluster", "web", "next", wait_limit=3 * TTL, say=said.append),
        ):
            took = time.monotonic() - killed
        assert said == ["waiting for deploy dead-deploy to finish"]
        assert took <= TTL + 3, f"the lock came free {took:.1f}s after the holder died"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_deploy_that_promotes_over_an_invalid_spec_says_so(etcd: Etcd) -> None:
    """Promotion touches etcd only, so the deployer runs it here without Docker (the
    engine and scheduler stand-ins are never called)."""
    from typing import Any, cast

    from deployer.pipeline import Deployer
    from deployer.progress import Settings
    from deployer.records import AppConfig

    said: list[str] = []
    async with open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as store:
        await store.put(keys.spec_key("/fluster", "web"), '{"hosts": ["bad host"]}')
        for name in ("a", "b"):
            instance = '{"host": "127.0.0.1", "port": 8001, "version": "v2"}'
            await store.put(keys.instance_key("/fluster", "web", name), instance)
        deployer = Deployer(
            store,
            "/fluster",
            cast(Any, None),
            cast(Any, None),
            Settings(wait_timeout=5),
            said.append,
        )
        await deployer._promote(AppConfig(service="web"), "v2")
        assert any("replaced an invalid spec" in line for line in said), said
        _, kv = await store.get(keys.spec_key("/fluster", "web"))
        assert kv is not None and b'"active_version":"v2"' in kv.value.replace(b" ", b"")


async def test_trimming_the_history_keeps_the_newest_ten_releases(etcd: Etcd) -> None:
    """60 records, the first 12 releases then 48 failed pushes: the newest 50 stay, and
    the 10 newest releases too, though older than those 50 (a run of failed pushes takes
    no rollback away); the numbering goes on from the newest release."""
    from deployer import apps
    from deployer.records import DeployRecord

    def record(n: int) -> DeployRecord:
        released = n < 12
        return DeployRecord(
            id=f"20261207T0000{n:02d}.000Z", app="web", kind="deploy", ref="main",
            version=f"{n:012x}", image=f"r/web:{n:012x}", by="dev", started="2026-12-07",
            result="succeeded" if released else "failed", number=n + 1 if released else 0,
        )  # fmt: skip

    async with open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as store:
        for n in range(60):
            await apps.record(store, "/trim", record(n))
        # The newest 50 are records 10-59; releases 2-9 (v3-v10) stay besides.
        assert await apps.trim(store, "/trim", "web") == 2
        history = await apps.history(store, "/trim", "web")
        ids = [r.id for r in history if isinstance(r, DeployRecord)]
        assert ids == [record(n).id for n in range(2, 60)]
        assert [r.name for r in apps.releases(history)] == [f"v{n}" for n in range(3, 13)]
        assert apps.next_number(history) == 13
        assert apps.find_release(history, "v12") is not None
        assert apps.find_release(history, "v2") is None  # trimmed
