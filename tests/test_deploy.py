"""A deploy end to end on real parts: etcd, the reloader with HAProxy, static sidekicks of
two versions in front of real HTTP backends, and the `fluster` CLI as an operator runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from testbed.load import Load
from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess
from tests.support.sidekick import Sidekicks

FLUSTER = str(Path(sys.executable).with_name("fluster"))
HOST = "web.localhost"
TTL = 3
pytestmark = pytest.mark.slow


def fluster(etcd: Etcd, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ETCD_ENDPOINTS": etcd.endpoints}
    proc = subprocess.run([FLUSTER, *args], capture_output=True, text=True, env=env, timeout=60)
    return proc


@pytest.fixture
def fleet(
    etcd: Etcd,
    backends,
    sidekicks: Sidekicks,
    start_reloader,  # type: ignore[no-untyped-def]
) -> tuple[ReloaderProcess, dict[str, list[HttpBackend]]]:
    apps = {"v1": backends(2, "v1"), "v2": backends(2, "v2")}
    for version, group in apps.items():
        for backend in group:
            sidekicks.start(
                "--service",
                "web",
                "--address",
                backend.address,
                "--app-version",
                version,
                "--ttl",
                str(TTL),
                "--drain-seconds",
                "1",
                "--check",
                "http:/",
            )
    wait_for(lambda: len(sidekicks.instances("web")) == 4, timeout=20, what="4 registered")
    return start_reloader(), apps


def idents(apps: dict[str, list[HttpBackend]], *versions: str) -> set[str]:
    return {b.ident for v in versions for b in apps[v]}


def test_side_by_side_canary_promote_rollback(
    etcd: Etcd, sidekicks: Sidekicks, fleet: tuple[ReloaderProcess, dict[str, list[HttpBackend]]]
) -> None:
    reloader, apps = fleet
    # No spec yet: old and new versions serve side by side.
    reloader.wait_served(HOST, idents(apps, "v1", "v2"))

    refused = fluster(etcd, "promote", "web", "v2", "--min-instances", "3")
    assert refused.returncode == 4, refused.stderr

    # v1 active, then a 25 % canary of v2 (2 servers each: per-server weights matter).
    assert fluster(etcd, "promote", "web", "v1", "--keep-old", "10m").returncode == 0
    reloader.wait_served(HOST, idents(apps, "v1"))
    canary = fluster(etcd, "canary", "web", "v2", "--weight", "25")
    assert canary.returncode == 0, canary.stderr
    assert "reloaders applied: 1/1" in canary.stdout
    counts = Counter(reloader.get(HOST)[1].split("-")[0] for _ in range(400))
    share = counts["v2"] / 400
    assert 0.15 <= share <= 0.35, counts  # 25 % +- 10 points over 400 round-robin picks

    # Promote v2 under load: nothing fails, and afterwards only v2 serves.
    with Load(reloader.http_port, HOST, limit=90.0, pace=0.002) as load:
        promoted = fluster(etcd, "promote", "web", "v2", "--keep-old", "10m")
        assert promoted.returncode == 0, promoted.stderr
        reloader.wait_served(HOST, idents(apps, "v2"))
        time.sleep(0.5)  # keep the load running a little past the switch (not a sync)
    assert load.failures == [], load.failures[:5]
    assert sum(load.served.values()) > 100

    # Within --keep-old the v1 records stay (unrouted), so a rollback has somewhere to go.
    assert {i.version for i in sidekicks.instances("web").values()} == {"v1", "v2"}
    rolled = fluster(etcd, "rollback", "web")
    assert rolled.returncode == 0, rolled.stderr
    reloader.wait_served(HOST, idents(apps, "v1"))

    # A final promote with no keep-old: v1 sidekicks drain, deregister and stay away.
    with Load(reloader.http_port, HOST, limit=90.0, pace=0.002) as load:
        assert fluster(etcd, "promote", "web", "v2", "--keep-old", "0s").returncode == 0
        reloader.wait_served(HOST, idents(apps, "v2"))
        wait_for(
            lambda: {i.version for i in sidekicks.instances("web").values()} == {"v2"},
            timeout=15,
            what="v1 deregistered",
        )
    assert load.failures == [], (load.failures[:5], reloader.log()[-6000:])
    deadline = time.monotonic() + 2 * TTL
    while time.monotonic() < deadline:  # v1 must not come back after its TTL
        assert {i.version for i in sidekicks.instances("web").values()} == {"v2"}
        time.sleep(0.2)
    refused = fluster(etcd, "rollback", "web")
    assert refused.returncode == 4 and "v1" in refused.stderr
