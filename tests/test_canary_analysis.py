"""Canary analysis by the edges' own counters, on real parts: etcd, two reloaders with
their HAProxy (two edges), static sidekicks in front of real HTTP backends, request
loops through both edges, and `fluster canary --steps` as an operator runs it.

A version that passes its health check (tcp) but answers 500 to one request in five is
rolled back at its first step; a good one goes through every step and is promoted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fluster.analysis import Window, window
from testbed.load import Load
from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess
from tests.support.sidekick import Sidekicks

FLUSTER = str(Path(sys.executable).with_name("fluster"))
HOST = "web.localhost"
pytestmark = pytest.mark.slow


def fluster(etcd: Etcd, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ETCD_ENDPOINTS": etcd.endpoints}
    return subprocess.run([FLUSTER, *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_window_is_what_every_edge_counted() -> None:
    # (responses, 5xx, mean response ms); edge-b had not published at the step's start.
    before = {"edge-a": {"v1": (100, 1, 5), "v2": (10, 0, 40)}}
    after = {
        "edge-a": {"v1": (190, 1, 5), "v2": (20, 2, 40)},
        "edge-b": {"v1": (80, 0, 15), "v2": (10, 2, 10)},
    }
    step = window(10, before, after, "v2", "v1")
    # The means are weighted by what each edge counted in the window: (10x40 + 10x10) / 20.
    assert step == Window(
        10, new=(20, 4), active=(170, 0), new_ms=25.0, active_ms=(90 * 5 + 80 * 15) / 170
    )
    assert step.line(1.0) == (
        "canary 10 %: 5xx 20.0 % of 20 responses (active 0.0 % of 170), bar 1.0 %"
    )
    # The active version erring more than the bar raises it: not the new one's fault.
    assert Window(10, new=(100, 5), active=(100, 8)).bar(1.0) == 8.0


def start(
    sidekicks: Sidekicks, backends: Callable[..., list[HttpBackend]], version: str, **kw: float
) -> list[HttpBackend]:
    group = backends(2, version, **kw)
    for backend in group:
        sidekicks.start(
            "--service", "web", "--address", backend.address, "--app-version", version,
            "--ttl", "3", "--check", "tcp",
        )  # fmt: skip
    return group


Fleet = Callable[..., list[ReloaderProcess]]


@pytest.fixture
def fleet(
    etcd: Etcd,
    sidekicks: Sidekicks,
    backends: Callable[..., list[HttpBackend]],
    start_reloader: Callable[..., ReloaderProcess],
) -> Fleet:
    """`fleet(edges, v1={}, v2={"delay": 0.3}, ...)`: two backends per version behind
    static sidekicks, `edges` reloaders (each with an id of its own), v1 promoted and
    served by every edge; returns the edges."""

    def make(edges: int = 1, **versions: dict[str, float]) -> list[ReloaderProcess]:
        for version, options in versions.items():
            start(sidekicks, backends, version, **options)
        count = 2 * len(versions)
        wait_for(lambda: len(sidekicks.instances("web")) == count, timeout=20, what="registered")
        started = [start_reloader("--id", f"edge-{n}") for n in range(edges)]
        assert fluster(etcd, "promote", "web", "v1").returncode == 0
        for edge in started:
            edge.wait_served(HOST, {"v1-0", "v1-1"})
        return started

    return make


def test_a_canary_failing_one_request_in_five_rolls_itself_back_and_a_good_one_is_promoted(
    etcd: Etcd, fleet: Fleet
) -> None:
    edges = fleet(2, v1={}, v2={"error_every": 5}, v3={})

    loads = [Load(edge.http_port, HOST, limit=120.0, pace=0.002) for edge in edges]
    for load in loads:
        load.__enter__()
    try:
        wait_for(lambda: all(sum(x.served.values()) > 50 for x in loads), what="load on both")
        t0 = [sum(x.served.values()) + len(x.failures) for x in loads]
        bad = fluster(etcd, "canary", "web", "v2", "--steps", "10,50", "--interval", "3s",
                      "--max-errors", "1%", "--min-requests", "20")  # fmt: skip
        # Both edges published their counts (the step waited for every live edge's).
        assert "reloaders applied: 2/2" in bad.stdout, bad.stdout
        seen = [
            sum(x.served.values()) + len(x.failures) - t for x, t in zip(loads, t0, strict=True)
        ]
        failed = sum(len(x.failures) for x in loads)
        assert bad.returncode == 4, bad.stdout + bad.stderr
        assert "canary 10 %: 5xx" in bad.stderr and "-> rolled back" in bad.stderr, bad.stderr
        assert "canary 50 %" not in bad.stdout + bad.stderr  # stopped at the first step
        # What users saw: a tenth of the window's requests went to v2, a fifth of those failed.
        print(f"bad canary: {failed} failed of {sum(seen)} requests in its window")
        assert failed <= 0.03 * sum(seen), (failed, seen)
        spec = json.loads(fluster(etcd, "spec", "web").stdout)
        assert spec["active_version"] == "v1" and spec["canary"] is None, spec

        for load in loads:  # from here on, not one request may fail
            load.failures.clear()
        env = {**os.environ, "ETCD_ENDPOINTS": etcd.endpoints}
        with subprocess.Popen(
            [FLUSTER, "canary", "web", "v3", "--steps", "10,50", "--interval", "2s"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        ) as proc:  # fmt: skip
            # Meanwhile each edge's status (and dashboard) shows its own counts of both.
            def counted() -> set[str]:
                return set(edges[1].status()["services"]["web"].get("analysis") or ())

            wait_for(lambda: counted() == {"v1", "v3"}, timeout=20, what="the edge's analysis")
            assert "Under canary analysis" in edges[1].http_get("/")[1]
            out, err = proc.communicate(timeout=120)
        good = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert good.returncode == 0, good.stdout + good.stderr
        steps = [
            line
            for line in good.stdout.splitlines()
            if line.startswith("canary ") and "5xx" in line
        ]
        assert [s.split(":")[0] for s in steps] == ["canary 10 %", "canary 50 %"], good.stdout
        assert all("5xx 0.0 %" in s for s in steps), steps
        for edge in edges:
            edge.wait_served(HOST, {"v3-4", "v3-5"})
        time.sleep(0.5)  # a few more requests on v3 alone (not a sync)
    finally:
        for load in loads:
            load.__exit__()
    assert all(x.failures == [] for x in loads), [x.failures[:5] for x in loads]
    # The analysis ended: no edge publishes web's counters any more.
    listing = ["etcdctl", "--endpoints", etcd.endpoints, "get", "--prefix", "--keys-only"]
    wait_for(
        lambda: (
            not subprocess.run(
                [*listing, "/fluster/counters/"], capture_output=True, text=True, check=False
            ).stdout.strip()
        ),
        timeout=10,
        what="the counters keys gone",
    )


def test_a_quiet_step_goes_on_with_a_warning(etcd: Etcd, fleet: Fleet) -> None:
    fleet(1, v1={}, v2={})
    quiet = fluster(etcd, "canary", "web", "v2", "--steps", "50", "--interval", "1s")
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "fewer than 20 responses in 3s, not judged; going on" in quiet.stderr, quiet.stderr
    assert json.loads(fluster(etcd, "spec", "web").stdout)["active_version"] == "v2"


def test_a_slower_canary_is_rolled_back_by_its_mean_response_time(etcd: Etcd, fleet: Fleet) -> None:
    """A latency regression: v2 answers every request right, 300 ms late. With
    --max-latency 100ms it is rolled back at its first step, naming both means."""
    (edge,) = fleet(1, v1={}, v2={"delay": 0.3})
    with Load(edge.http_port, HOST, limit=120.0, pace=0.002) as load:
        wait_for(lambda: sum(load.served.values()) > 50, what="load running")
        slow = fluster(etcd, "canary", "web", "v2", "--steps", "20", "--interval", "3s",
                       "--max-latency", "100ms", "--min-requests", "5")  # fmt: skip
    assert slow.returncode == 4, slow.stdout + slow.stderr
    assert "5xx 0.0 %" in slow.stderr and "-> rolled back" in slow.stderr, slow.stderr
    mean = int(slow.stderr.split("mean response ")[1].split(" ms")[0])
    assert mean >= 250, slow.stderr
    assert load.failures == [], load.failures[:5]
    assert json.loads(fluster(etcd, "spec", "web").stdout)["canary"] is None
