"""The dashboard as a person sees it: a real reloader (real etcd, HAProxy, HTTP backends on
loopback) rendered by headless Chromium; assertions on the DOM Chromium built, and
screenshots kept in .cache/test-artifacts/ (FLUSTER_TEST_ARTIFACTS) to look at.

The states: a healthy edge, an edge with a rejected record, a service whose active version
has no instance (served by a fallback version, then, strict, routed to nothing).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from tests.support import browser
from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess

Start = Callable[..., ReloaderProcess]
Backends = Callable[..., list[HttpBackend]]
KEY = "/fluster/services/{}/instances/{}"
SPEC = "/fluster/services/{}/spec"


def look(reloader: ReloaderProcess, name: str) -> browser.Element:
    """Screenshot the page and return the DOM Chromium made of it."""
    url = f"http://127.0.0.1:{reloader.status_port}/"
    browser.screenshot(url, name)
    return browser.parse(browser.dump_dom(url))


def card(dom: browser.Element, service: str) -> browser.Element:
    cards = [c for c in dom.find_all("service") if c.attrs.get("data-service") == service]
    assert len(cards) == 1, f"cards for {service}: {[c.text[:80] for c in cards]}"
    return cards[0]


def states(el: browser.Element) -> list[str]:
    return sorted(row.attrs["data-state"] for row in el.find_all("instance"))


async def test_dashboard_in_a_browser(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    a, b, c, d = backends(4)
    etcd.put(SPEC.format("web"), json.dumps({"active_version": "v1", "hosts": ["web.example"]}))
    etcd.put(KEY.format("web", "web-1"), a.json(version="v1"))
    etcd.put(KEY.format("web", "web-2"), b.json(version="v1"))
    etcd.put(KEY.format("web", "web-3"), c.json(version="v2"))
    etcd.put(KEY.format("api", "api-1"), d.json(version="3.1", state="draining"))
    reloader = start_reloader()
    reloader.wait_served("web.example", {a.ident, b.ident})
    etcd.put(KEY.format("api", "api-2"), d.json(version="3.1"))  # an apply to list
    wait_for(
        lambda: reloader.status()["recent_applies"] and reloader.status()["lag"] == "in step",
        what="an apply on record and the edge in step",
    )

    # 1. Healthy: everything green, the edge's numbers with units, applies in a table.
    dom = look(reloader, "dashboard-healthy.png")
    assert dom.by_id("attention").text == "all well"
    assert dom.by_id("haproxy").find_all(tag="div")[1].text == "up"
    assert "in step" in dom.by_id("lag").text
    assert re.search(r"\d+(\.\d)? (ms|s) ago", dom.by_id("sync").text), dom.by_id("sync").text
    assert "reachable" in dom.by_id("etcd").text
    assert "unreachable" not in dom.by_id("etcd").text
    web = card(dom, "web")
    assert "web.example" in web.text
    assert "Active version: v1" in web.text
    assert states(web) == ["routed", "routed", "up"]  # v2 is up but not the active version
    api = card(dom, "api")
    assert states(api) == ["draining", "routed"]
    assert "alarm" not in web.classes | api.classes
    rows = dom.by_id("applies").find_all("apply")
    assert rows, "recent applies listed"
    assert re.search(r"ago \d+ api: \+1 instance runtime API [\d.]+ ms 3$", rows[0].text), rows[
        0
    ].text
    assert dom.by_id("latency").find_all(tag="circle"), "latency chart has points"

    # 2. A rejected record: listed with its reason, the page asks for attention.
    etcd.put(KEY.format("web", "bad"), '{"host": "10.0.0.1", "port": "eighty"}')
    wait_for(lambda: reloader.status()["rejected_records"] == 1, what="the record rejected")
    dom = look(reloader, "dashboard-rejected-record.png")
    rejected = dom.by_id("rejected").find_all("rejected-row")
    assert len(rejected) == 1
    assert "/fluster/services/web/instances/bad" in rejected[0].text
    assert "port" in rejected[0].text
    assert "need" in dom.by_id("attention").text
    assert states(card(dom, "web")) == ["routed", "routed", "up"]  # unaffected

    # 3. Promote a version nobody runs: web falls back to the newest version that has
    # instances, and the page says so in amber.
    etcd.put(SPEC.format("web"), json.dumps({"active_version": "v9", "hosts": ["web.example"]}))
    wait_for(
        lambda: reloader.status()["services"]["web"]["fallback_version"] == "v2",
        what="web falling back to v2",
    )
    dom = look(reloader, "dashboard-fallback.png")
    web = card(dom, "web")
    assert "caution" in web.classes
    assert "active version v9 has no instance up: serving v2" in web.text
    assert states(web) == ["routed", "up", "up"]

    # 4. The same, strict: web routes to nothing, red, said in words.
    etcd.put(
        SPEC.format("web"),
        json.dumps({"active_version": "v9", "hosts": ["web.example"], "strict_active": True}),
    )
    wait_for(
        lambda: reloader.status()["services"]["web"]["routes_to_nothing"],
        what="web routing to nothing",
    )
    dom = look(reloader, "dashboard-routes-to-nothing.png")
    web = card(dom, "web")
    assert "alarm" in web.classes
    assert "routes to nothing" in web.text
    assert states(web) == ["up", "up", "up"]
    assert any("web: routes to nothing" in p.text for p in dom.find_all("problem-service"))
    assert "alarm" not in card(dom, "api").classes
