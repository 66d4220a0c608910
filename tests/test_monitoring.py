"""The alert rules and the Grafana dashboard shipped in docs/monitoring/ are checked:
the rules by promtool (syntax, and a unit test per alert: fires on its series, quiet on a
healthy edge), and every metric either of them names against a real reloader's /metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.support.haproxy import ReloaderProcess

Start = Callable[..., ReloaderProcess]
MONITORING = Path(__file__).parents[1] / "docs" / "monitoring"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
METRIC = re.compile(r"\breloader_[a-z_]+\b")


def promtool(*args: str) -> str:
    proc = subprocess.run(
        [PROMTOOL, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} exited {proc.returncode}:\n{out}"
    return out


def test_alert_rules_pass_promtool() -> None:
    alerts = (MONITORING / "alerts.yml").read_text().count("- alert: ")
    assert f"SUCCESS: {alerts} rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


def rule_exprs() -> list[str]:
    text = (MONITORING / "alerts.yml").read_text()
    return re.findall(r"^\s+expr: (.+)$", text, re.M)


def dashboard_exprs() -> list[str]:
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert all(p["targets"] for p in dash["panels"] if p["type"] != "row"), "every panel queries"
    variable = dash["templating"]["list"][0]["query"]["query"]
    return [*exprs, variable]


def test_rules_and_dashboard_name_only_metrics_a_reloader_serves(start_reloader: Start) -> None:
    reloader = start_reloader()
    names = {m.split("{", 1)[0] for m in reloader.metrics()}
    # A labelled gauge with no series yet (no certificate, no fallback) is still declared.
    names |= set(re.findall(r"^# TYPE (\S+) gauge$", reloader.http_get("/metrics")[1], re.M))
    for source, exprs in (
        ("alerts.yml", rule_exprs()),
        ("grafana-dashboard.json", dashboard_exprs()),
    ):
        used = {m for e in exprs for m in METRIC.findall(e)}
        assert used, f"{source}: no reloader metric found"
        assert used <= names, f"{source} names metrics /metrics does not serve: {used - names}"
    # Each alert OPERATIONS.md tells operators to set up exists as a rule.
    operations = (MONITORING.parent / "OPERATIONS.md").read_text()
    advised = operations.split("Alert on:", 1)[1].split("\n\n", 1)[0]
    rules = " ".join(rule_exprs())
    for metric in set(METRIC.findall(advised)):
        assert metric in rules, f"OPERATIONS.md advises an alert on {metric}; no rule uses it"
