"""HTTP routing by one map lookup, against real etcd, real HAProxy and real backends."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess

Start = Callable[..., ReloaderProcess]
Backends = Callable[..., list[HttpBackend]]
KEY = "/fluster/services/{}/instances/{}"
SPEC = "/fluster/services/{}/spec"


async def test_map_routing_by_host_longest_path_prefix_and_canary(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    web, api, docs, v1, v2 = backends(5)
    etcd.put(KEY.format("web", "a"), web.json())
    etcd.put(SPEC.format("api"), json.dumps({"hosts": ["x.example", "::1"], "path_prefix": "/v1"}))
    etcd.put(KEY.format("api", "a"), api.json())
    etcd.put(SPEC.format("docs"), json.dumps({"hosts": ["X.example"], "path_prefix": "/v1/docs/"}))
    etcd.put(KEY.format("docs", "a"), docs.json())
    canary = {"active_version": "v1", "canary": {"version": "v2", "weight": 30}}
    etcd.put(SPEC.format("shop"), json.dumps(canary))
    etcd.put(KEY.format("shop", "a"), v1.json(version="v1"))
    etcd.put(KEY.format("shop", "b"), v2.json(version="v2"))
    reloader = start_reloader()
    reloader.wait_served("shop.localhost", {v1.ident, v2.ident}, timeout=20)
    cases = {
        ("web.localhost", "/anything"): (200, web.ident),
        ("WEB.localhost:8080", "/"): (200, web.ident),  # case and port do not matter
        ("x.example", "/v1"): (200, api.ident),
        ("x.example", "/v1/users"): (200, api.ident),
        ("x.example", "/v1x"): (404, None),  # a prefix is a path segment, not a string
        ("x.example", "/"): (404, None),
        ("x.example", "/v1/docs/intro"): (200, docs.ident),  # the longest prefix wins
        ("[::1]:8080", "/v1/a"): (200, api.ident),  # an IPv6 literal with a port
        ("[::1]", "/v1/a"): (200, api.ident),
        # A comma list is not routed by its first (or any) element.
        ("other.localhost,web.localhost", "/"): (404, None),
        ("web.localhost,other.localhost", "/"): (404, None),
        ("nope.localhost", "/"): (404, None),
    }
    for (host, path), (status, ident) in cases.items():
        got = reloader.get(host, path)
        assert got[0] == status, f"{host}{path}: {got}"
        if ident is not None:
            assert got[1] == ident, f"{host}{path}: {got}"
    shares = Counter(reloader.get("shop.localhost")[1] for _ in range(300))
    assert set(shares) == {v1.ident, v2.ident}, shares
    assert 40 <= shares[v2.ident] <= 140, f"30% canary, got {shares}"  # binomial, ~6 sigma
    # The canary's instances gone: all of shop's traffic goes to the active version.
    etcd.delete(KEY.format("shop", "b"))
    reloader.wait_served("shop.localhost", {v1.ident})
    routes = (reloader.state_dir / "routes.map").read_text()
    assert "x.example/v1/docs/ be_docs\n" in routes
    assert "acl " not in reloader.config
    wait_for(lambda: reloader.get("x.example", "/v1")[0] == 200, what="still routed")


async def test_a_new_http_service_is_served_by_the_same_worker_until_the_pool_runs_out(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    web, one, two, three = backends(4)
    etcd.put(KEY.format("web", "a"), web.json())
    # Without the guard, which would hold the removal of a whole service for 30 s.
    reloader = start_reloader("--http-pool", "2", "--no-removal-guard")
    reloader.wait_served("web.localhost", {web.ident})
    workers = reloader.workers()
    etcd.put(KEY.format("one", "a"), one.json())
    reloader.wait_served("one.localhost", {one.ident})
    # A new route of an existing service is a map entry too.
    etcd.put(SPEC.format("web"), json.dumps({"hosts": ["web.localhost", "www.localhost"]}))
    reloader.wait_served("www.localhost", {web.ident})
    etcd.put(KEY.format("two", "a"), two.json())
    reloader.wait_served("two.localhost", {two.ident})
    assert reloader.workers() == workers, "new services in the pool need no new worker"
    assert "one.localhost/ pool_0" in reloader.admin(f"show map {reloader.state_dir}/routes.map")
    status = reloader.status()
    assert status["pool_free"] == 0 and status["pool_fallbacks"] == 0
    assert status["applies"]["reload"] == 0
    # The files follow once the catalog is quiet for a moment, and reproduce the runtime
    # state: a reload of them serves the same.
    map_file = reloader.state_dir / "routes.map"

    def written() -> bool:
        routes, config = map_file.read_text(), reloader.config
        return (
            "one.localhost/ pool_0\n" in routes
            and "two.localhost/ pool_1\n" in routes
            and "backend pool_0\n" in config
            and "server a 127.0.0.1:" in config.split("backend pool_0\n")[1]
        )

    wait_for(written, what=f"the pool's routes and servers written to {reloader.state_dir}")

    # The pool is empty: the next new service takes a reload, and it is counted.
    etcd.put(KEY.format("three", "a"), three.json())
    reloader.wait_served("three.localhost", {three.ident})
    assert reloader.workers() != workers
    wait_for(lambda: reloader.status()["applies"]["reload"] == 1, what="the reload counted")
    status = reloader.status()
    assert status["pool_fallbacks"] == 1
    assert status["pool_free"] == 2, "the reload renders a full pool again"
    routes = (reloader.state_dir / "routes.map").read_text()
    assert "one.localhost/ be_one\n" in routes and "three.localhost/ be_three\n" in routes
    for host, backend in (("one", one), ("two", two), ("www", web)):
        assert reloader.get(f"{host}.localhost") == (200, backend.ident)
    _, metrics = reloader.http_get("/metrics")
    assert "reloader_pool_fallbacks_total 1.0" in metrics
    assert "reloader_pool_free 2.0" in metrics

    # A service that goes away is unrouted at once, without a reload either.
    workers = reloader.workers()
    etcd.delete(KEY.format("two", "a"))
    wait_for(lambda: reloader.get("two.localhost")[0] == 404, what="two unrouted")
    etcd.delete(KEY.format("three", "a"))
    wait_for(lambda: reloader.get("three.localhost")[0] == 404, what="three unrouted")
    assert reloader.workers() == workers


async def test_a_used_up_pool_is_refilled_by_one_reload_once_the_catalog_is_quiet(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    one, two = backends(2)
    reloader = start_reloader("--http-pool", "2")
    etcd.put(KEY.format("one", "a"), one.json())
    etcd.put(KEY.format("two", "a"), two.json())
    reloader.wait_served("one.localhost", {one.ident})
    reloader.wait_served("two.localhost", {two.ident})
    assert reloader.status()["pool_free"] == 0
    # Below half of the pool, and nothing changes for 10 s: one reload renames and refills.
    wait_for(
        lambda: reloader.status()["pool_free"] == 2,
        timeout=40,
        what="the pool refilled (pool_free 2)",
    )
    status = reloader.status()
    assert status["applies"]["reload"] == 1 and status["pool_fallbacks"] == 0
    routes = (reloader.state_dir / "routes.map").read_text()
    assert "one.localhost/ be_one\n" in routes and "two.localhost/ be_two\n" in routes
    assert reloader.get("one.localhost") == (200, one.ident)
    assert reloader.get("two.localhost") == (200, two.ident)
