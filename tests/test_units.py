"""The fleet units in units/ must also be valid systemd units (fleet hands them to systemd).

`systemd-analyze verify` checks them as systemd would load them: templates are verified
as instances (app@1.service), since verifying a bare template checks almost nothing.
The fleet-specific relations are checked by reading the files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "units"
FLEET_KEYS = {"MachineID", "MachineOf", "MachineMetadata", "Conflicts", "Global", "Replaces"}


def parse(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (keys may repeat), with backslash continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{path.name}: key outside a section: {line}"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(" ".join(value.split()))
    return sections


def unit_files() -> list[Path]:
    return sorted(UNITS.glob("*.service"))


def test_the_three_units_exist() -> None:
    names = {p.name for p in unit_files()}
    assert {"app@.service", "app-sidekick@.service", "haproxy-reloader.service"} <= names


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    docker = Path("/usr/bin/docker")
    targets = []
    for unit in unit_files():
        name = unit.name.replace("@.", "@1.")  # templates are verified as an instance
        text = unit.read_text()
        if not os.access(docker, os.X_OK):
            # verify insists that ExecStart binaries exist; without Docker installed, check
            # everything else against a binary that does.
            text = text.replace(str(docker), "/bin/sh")
        (tmp_path / name).write_text(text)
        targets.append(f"./{name}")
    proc = subprocess.run(
        ["systemd-analyze", "verify", *targets],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # Unknown keys and bad values are only warnings to systemd; they are errors here.
    ours = [line for line in output.splitlines() if str(tmp_path) in line or "@1.service" in line]
    assert ours == [], output


def test_sidekick_is_bound_to_its_app_on_the_same_machine() -> None:
    unit = parse(UNITS / "app-sidekick@.service")
    assert unit["Unit"]["BindsTo"] == ["app@%i.service"]
    assert "app@%i.service" in " ".join(unit["Unit"]["After"]).split()
    assert unit["X-Fleet"]["MachineOf"] == ["app@%i.service"]


def test_app_pulls_in_its_sidekick() -> None:
    unit = parse(UNITS / "app@.service")
    assert "app-sidekick@%i.service" in " ".join(unit["Unit"]["Wants"]).split()


def test_haproxy_reloader_runs_on_every_machine() -> None:
    unit = parse(UNITS / "haproxy-reloader.service")
    assert unit["X-Fleet"]["Global"] == ["true"]
    assert unit["Service"]["Restart"] == ["always"]


@pytest.mark.parametrize("unit", unit_files(), ids=lambda p: p.name)
def test_fleet_sections_use_fleet_keys_only(unit: Path) -> None:
    fleet = parse(unit).get("X-Fleet", {})
    assert set(fleet) <= FLEET_KEYS


@pytest.mark.parametrize("unit", unit_files(), ids=lambda p: p.name)
def test_units_read_settings_from_the_example_env_files(unit: Path) -> None:
    """Every ${VAR} a unit uses is defined by the example env files it documents."""
    defined = set()
    for example in UNITS.glob("*.env.example"):
        defined |= {
            line.split("=", 1)[0]
            for line in example.read_text().splitlines()
            if line and not line.startswith("#")
        }
    used = set(re.findall(r"\$\{(\w+)\}", unit.read_text()))
    assert used <= defined, sorted(used - defined)


def test_routing_falls_back_to_the_most_recent_version_with_instances_up() -> None:
    from fluster.catalog import Service
    from fluster.records import Instance, ServiceSpec
    from fluster.routing import routing

    def inst(version: str, state: str = "up") -> Instance:
        return Instance(host="10.0.0.1", port=80, version=version, state=state)  # type: ignore[arg-type]

    instances = {"a": inst("v1"), "b": inst("v2"), "c": inst("v3", "draining"), "d": inst("v0")}
    spec = ServiceSpec(active_version="v3", history=("v2", "v1"))
    svc = Service(name="web", spec=spec, instances=instances)
    decided = routing(svc)
    assert (decided.fallback, list(decided.instances)) == ("v2", ["b"])
    assert routing(svc, strict=True).empty
    # Healthy active version: as the spec says, no fallback.
    healthy = Service(name="web", spec=spec, instances={**instances, "c": inst("v3")})
    assert (routing(healthy).fallback, list(routing(healthy).instances)) == (None, ["c"])
    # Nothing in the history is up: the version with most instances up.
    lone = Service(name="web", spec=spec, instances={"d": inst("v0"), "c": inst("v3", "draining")})
    assert routing(lone).fallback == "v0"
    # Nothing up at all, or every version routed: never a fallback.
    assert routing(Service(name="web", spec=spec, instances={"c": instances["c"]})).empty
    assert routing(Service(name="web", instances=instances)).fallback is None


def test_ls_text_colours_problems_only_when_asked_and_shows_age() -> None:
    from datetime import UTC, datetime

    from fluster.catalog import Service, Snapshot
    from fluster.listing import Paint, instances_text, services_text
    from fluster.records import Instance, ReloaderStatus, ServiceSpec

    inst = Instance.from_dict(
        {
            "host": "10.0.0.1",
            "port": 80,
            "version": "v1",
            "node": "n1",
            "since": "2026-01-01T10:00:00Z",
        }
    )
    dead = Service(name="api", instances={"a": inst.replace(state="draining")})
    ok = Service(name="web", spec=ServiceSpec(active_version="v1"), instances={"a": inst})
    snap = Snapshot(revision=9, services={"api": dead, "web": ok})
    live = {"edge": ReloaderStatus(applied_revision=5, node="e", at="")}
    coloured = services_text(snap, live, {"edge": 2}, Paint(True))
    assert "\033[31mapi: routes to nothing" in coloured
    assert "\033[33medge behind by 2 changes\033[0m" in coloured
    assert "\033[" not in services_text(snap, live, {"edge": 2}, Paint(False))
    text = instances_text(ok, datetime(2026, 1, 1, 13, 5, tzinfo=UTC), Paint(False))
    assert text.splitlines()[3].split() == [
        "a",
        "10.0.0.1:80",
        "v1",
        "up",
        "n1",
        "3h",
        "100",
        "yes",
    ]


def test_ls_json_instances_are_the_records_fields() -> None:
    import json

    from fluster.listing import _fields
    from fluster.records import Instance

    inst = Instance.from_dict(
        {
            "host": "::1",
            "port": 80,
            "version": "v1",
            "tags": {"a": "b"},
            "since": "2026-01-01T00:00:00Z",
        }
    )
    assert _fields(inst) == json.loads(inst.to_json())
