"""The `fluster` operator CLI against a real etcd (no reloader: see test_deploy.py for those).

Commands run as real subprocesses where concurrency or exit codes matter, and through
`fluster.cli.main` elsewhere for speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fluster import ops
from fluster.records import ServiceSpec
from fluster.store import Conflict, EtcdSettings, open_store
from tests.support.etcd import Etcd, wait_for

PREFIX = "/fluster"
FLUSTER = str(Path(sys.executable).with_name("fluster"))


def register(etcd: Etcd, service: str, name: str, version: str, port: int = 80) -> None:
    record = {"host": "10.0.0.1", "port": port, "version": version}
    etcd.put(f"{PREFIX}/services/{service}/instances/{name}", json.dumps(record))


def spec_of(etcd: Etcd, service: str) -> ServiceSpec:
    out = etcd.ctl("get", "--print-value-only", f"{PREFIX}/services/{service}/spec", check=True)
    return ServiceSpec.parse(out.stdout.strip() or "{}")


def fluster(etcd: Etcd, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ETCD_ENDPOINTS": etcd.endpoints}
    return subprocess.run([FLUSTER, *args], capture_output=True, text=True, env=env, timeout=60)


def test_ls_shows_services_versions_and_skipped_records(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("ls")[1].startswith("no services")
    register(etcd, "web", "a", "v1")
    register(etcd, "web", "b", "v2")
    etcd.put(f"{PREFIX}/services/web/instances/evil", '{"host": "1.2.3.4\\nbackend x"}')
    code, out, _ = cli("ls")
    assert code == 0
    assert "web" in out and "v1:1 v2:1" in out and "1 invalid record(s) skipped" in out
    code, out, _ = cli("ls", "web", "--json")
    data = json.loads(out)
    assert sorted(data["services"]["web"]["instances"]) == ["a", "b"]
    assert list(data["rejected"]) == [f"{PREFIX}/services/web/instances/evil"]
    assert cli("ls", "nope")[0] == 1


def test_spec_edits_are_validated_and_nothing_is_written_on_error(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("spec", "api", "--host", "api.example.com", "--check", "/health")
    assert code == 0, out
    spec = spec_of(etcd, "api")
    assert spec.hosts == ("api.example.com",) and spec.check and spec.check.path == "/health"
    code, _, err = cli("spec", "api", "--port", "70000")
    assert code == 2 and "port" in err
    code, _, err = cli("spec", "api", "--host", "evil.com\nbind :1")
    assert code == 2
    assert spec_of(etcd, "api") == spec


def test_promote_refused_below_min_instances(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    register(etcd, "web", "a", "v1")
    register(etcd, "web", "b", "v2")
    code, _, err = cli("promote", "web", "v2", "--min-instances", "2", "--no-wait")
    assert code == 4 and "fewer than --min-instances 2" in err
    assert spec_of(etcd, "web").active_version is None


def test_promote_canary_rollback_and_gc(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    for i in range(2):
        register(etcd, "web", f"old{i}", "v1")
        register(etcd, "web", f"new{i}", "v2")
    assert cli("promote", "web", "v1", "--no-wait")[0] == 0
    code, out, err = cli("canary", "web", "v2", "--weight", "10", "--no-wait")
    assert code == 0, err
    spec = spec_of(etcd, "web")
    assert spec.active_version == "v1" and spec.canary and spec.canary.weight == 10

    assert cli("promote", "web", "v2", "--keep-old", "1h", "--no-wait")[0] == 0
    spec = spec_of(etcd, "web")
    assert (spec.active_version, spec.canary, spec.history) == ("v2", None, ("v1",))

    code, _, err = cli("gc", "web")
    assert code == 4 and "kept until" in err  # --keep-old protects a rollback
    assert cli("rollback", "web", "--no-wait")[0] == 0
    assert spec_of(etcd, "web").active_version == "v1"

    assert cli("promote", "web", "v2", "--keep-old", "0s", "--no-wait")[0] == 0
    code, out, _ = cli("gc", "web")
    assert code == 0 and "removed 2 record(s)" in out
    left = etcd.ctl("get", "--prefix", "--keys-only", f"{PREFIX}/services/web/instances/").stdout
    assert sorted(left.split()) == [f"{PREFIX}/services/web/instances/new{i}" for i in range(2)]
    code, _, err = cli("rollback", "web", "--no-wait")
    assert code == 4 and "no instance of the previous version v1" in err


def test_drain_keeps_the_lease(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    lease = etcd.grant(30)
    key = f"{PREFIX}/services/web/instances/a"
    etcd.put(key, "10.0.0.1:80", lease=lease)
    assert cli("drain", "web", "a", "--no-wait")[0] == 0
    out = etcd.ctl("get", key, "-w", "json", check=True).stdout
    kv = json.loads(out)["kvs"][0]
    assert kv["lease"] == int(lease, 16)
    assert json.loads(__import__("base64").b64decode(kv["value"]))["state"] == "draining"


async def test_a_stale_write_is_a_conflict(etcd: Etcd) -> None:
    register(etcd, "web", "a", "v1")
    register(etcd, "web", "b", "v2")
    async with open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as store:
        stale = (await ops.snapshot(store, PREFIX)).services["web"]
        await ops.promote(store, PREFIX, "web", "v1")  # another operator got there first
        with pytest.raises(Conflict):
            await ops.write_spec(store, PREFIX, stale, stale.spec.replace(active_version="v2"))
    assert spec_of(etcd, "web").active_version == "v1"


def test_concurrent_promotes_lose_no_update(etcd: Etcd) -> None:
    """Eight operators promote at once: each either wins or exits 3, and no win is lost."""
    versions = [f"v{i}" for i in range(8)]
    for v in versions:
        register(etcd, "web", f"i-{v}", v)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def promote(version: str) -> None:
        results[version] = fluster(etcd, "promote", "web", version, "--no-wait")

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = {v: r.returncode for v, r in results.items()}
    assert set(codes.values()) <= {0, 3}, {v: r.stderr for v, r in results.items()}
    winners = [v for v, c in codes.items() if c == 0]
    spec = spec_of(etcd, "web")
    # Each win pushed the previous active version onto the history: none overwritten.
    assert len(spec.history) == len(winners) - 1
    assert spec.active_version in winners
    assert {spec.active_version, *spec.history} == set(winners)
    for v, r in results.items():
        if r.returncode == 3:
            assert "conflict" in r.stderr, v


def test_promote_waits_for_every_reloader(etcd: Etcd) -> None:
    """Reloaders are stood in by their records (the real ones are tested in test_deploy)."""
    register(etcd, "web", "a", "v2")
    status = {"applied_revision": 1, "node": "edge", "at": "2026-01-01T00:00:00Z"}
    etcd.put(f"{PREFIX}/reloaders/edge-1", json.dumps(status))
    slow = fluster(etcd, "promote", "web", "v2", "--wait-timeout", "1")
    assert slow.returncode == 5 and "edge-1" in slow.stderr

    promoted = spec_revision(etcd)
    proc = subprocess.Popen(
        [FLUSTER, "canary", "web", "v2", "--weight", "0", "--wait-timeout", "20"],
        env={**os.environ, "ETCD_ENDPOINTS": etcd.endpoints},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        target = wait_for(lambda: spec_revision(etcd) > promoted and spec_revision(etcd))
        etcd.put(f"{PREFIX}/reloaders/edge-1", json.dumps({**status, "applied_revision": target}))
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
        assert "reloaders applied: 0/1" in out and "reloaders applied: 1/1" in out
    finally:
        proc.kill()


def spec_revision(etcd: Etcd) -> int:
    out = etcd.ctl("get", f"{PREFIX}/services/web/spec", "-w", "json", check=True).stdout
    kvs = json.loads(out).get("kvs", [])
    return int(kvs[0]["mod_revision"]) if kvs else 0


def test_bad_settings_are_all_reported_with_exit_2(etcd: Etcd) -> None:
    env = {**os.environ, "ETCD_ENDPOINTS": "nope:port", "ETCD_CERT": "/missing.pem"}
    proc = subprocess.run([FLUSTER, "ls"], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 2
    assert "--etcd-endpoints" in proc.stderr and "--etcd-cert" in proc.stderr
    assert "--etcd-cert and --etcd-key go together" in proc.stderr


def test_unreachable_etcd_is_exit_1_with_a_clear_message() -> None:
    env = {**os.environ, "ETCD_ENDPOINTS": "127.0.0.1:1"}
    proc = subprocess.run([FLUSTER, "ls"], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 1
    assert "etcd unreachable" in proc.stderr


def register_state(etcd: Etcd, service: str, name: str, version: str, state: str) -> None:
    record = {"host": "10.0.0.1", "port": 80, "version": version, "state": state}
    etcd.put(f"{PREFIX}/services/{service}/instances/{name}", json.dumps(record))


def test_rollback_from_the_first_promotion_returns_to_all(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    register(etcd, "web", "a", "v1")
    register(etcd, "web", "b", "v2")
    assert cli("promote", "web", "v2", "--no-wait")[0] == 0
    code, out, err = cli("rollback", "web", "--no-wait")
    assert code == 0, err
    assert "rolled back to (all)" in out
    spec = spec_of(etcd, "web")
    assert (spec.active_version, spec.history) == (None, ())
    code, _, err = cli("rollback", "web", "--no-wait")
    assert code == 4 and "routes every version already" in err


def test_promote_refuses_to_route_to_nothing_unless_forced(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    register(etcd, "web", "a", "v1")
    register_state(etcd, "web", "b", "v2", "draining")
    code, _, err = cli("promote", "web", "v2", "--min-instances", "0", "--no-wait")
    assert code == 4 and "route to nothing" in err
    assert spec_of(etcd, "web").active_version is None
    code, _, err = cli("promote", "web", "v2", "--min-instances", "0", "--force", "--no-wait")
    assert code == 0, err
    assert spec_of(etcd, "web").active_version == "v2"


def test_gc_refuses_to_remove_the_version_a_service_falls_back_to(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    register(etcd, "web", "old", "v1")
    register(etcd, "web", "new", "v2")
    assert cli("promote", "web", "v2", "--keep-old", "0s", "--no-wait")[0] == 0
    register_state(etcd, "web", "new", "v2", "draining")  # v2 scaled away by mistake
    code, _, err = cli("gc", "web")
    assert code == 4 and "served by v1" in err and "route it to nothing" in err
    left = etcd.ctl("get", "--prefix", "--keys-only", f"{PREFIX}/services/web/instances/").stdout
    assert f"{PREFIX}/services/web/instances/old" in left.split()
    code, out, err = cli("gc", "web", "--force")
    assert code == 0 and "removed 1 record(s)" in out, err


def reloader_at(etcd: Etcd, name: str, revision: int) -> None:
    status = {"applied_revision": revision, "node": "edge", "at": "2026-01-01T00:00:00Z"}
    etcd.put(f"{PREFIX}/reloaders/{name}", json.dumps(status))


def test_ls_says_in_step_or_behind_by_n(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli("ls")
    assert "reloaders: none registered" in out
    register(etcd, "web", "a", "v1")
    register(etcd, "web", "b", "v1")
    applied = etcd.revision()
    reloader_at(etcd, "edge-1", applied)
    code, out, _ = cli("ls")
    assert code == 0 and "reloaders: edge-1 in step" in out, out
    register(etcd, "web", "c", "v1")  # created
    register(etcd, "web", "a", "v1", port=81)  # changed
    etcd.delete(f"{PREFIX}/services/web/instances/b")  # deleted
    reloader_at(etcd, "edge-2", etcd.revision())
    code, out, _ = cli("ls")
    assert "edge-1 behind by 3 changes" in out and "edge-2 in step" in out, out
    assert "\033[" not in out  # not a terminal: no colour
    code, out, _ = cli("ls", "--json")
    reloaders = json.loads(out)["reloaders"]
    assert (reloaders["edge-1"]["behind"], reloaders["edge-2"]["behind"]) == (3, 0)
    reloader_at(etcd, "edge-3", etcd.revision() + 1000)  # etcd restored from a backup
    code, out, err = cli("ls")
    assert code == 0 and "edge-3 ahead of etcd" in out, err


def test_ls_warns_when_a_service_routes_to_nothing_or_falls_back(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    register(etcd, "web", "old", "v1")
    register(etcd, "web", "new", "v2")
    register_state(etcd, "api", "a", "v1", "draining")
    assert cli("promote", "web", "v2", "--no-wait")[0] == 0
    register_state(etcd, "web", "new", "v2", "draining")
    code, out, _ = cli("ls")
    assert code == 0
    assert "api: routes to nothing: no instance is up" in out, out
    assert "web: active version v2 has no instance up; the edge serves v1 (1 up)" in out
    code, out, _ = cli("ls", "web")
    assert "VERSION" in out and "AGE" in out and "NODE" in out
    assert "old" in out and "fallback" in out
    code, out, _ = cli("ls", "--json")
    services = json.loads(out)["services"]
    assert services["api"]["routes_to_nothing"] is True
    assert services["web"]["fallback_version"] == "v1"
    assert services["web"]["instances"]["old"]["routed"] is True


def test_spec_refuses_a_host_or_port_another_service_has(etcd: Etcd, cli) -> None:  # type: ignore[no-untyped-def]
    register(etcd, "web", "a", "v1")
    code, _, err = cli("spec", "aaa", "--host", "web.localhost")
    assert code == 4 and "host web.localhost belongs to service web" in err, err
    code, _, err = cli("spec", "aaa", "--host", "web.example.com", "--domain", "example.com")
    assert code == 4 and "belongs to service web" in err, err
    assert cli("spec", "api", "--host", "api.example.com")[0] == 0
    code, _, err = cli("spec", "aaa", "--host", "api.example.com")
    assert code == 4 and "belongs to service api" in err
    assert cli("spec", "aaa", "--host", "api.example.com", "--path-prefix", "/aaa")[0] == 0
    assert cli("spec", "db", "--mode", "tcp", "--port", "15432")[0] == 0
    code, _, err = cli("spec", "db2", "--mode", "tcp", "--port", "15432")
    assert code == 4 and "TCP port 15432 belongs to service db" in err
    assert "db2" not in etcd.ctl("get", "--prefix", "--keys-only", f"{PREFIX}/").stdout


SPEC_KEY = f"{PREFIX}/services/web/spec"


def test_an_invalid_spec_with_no_valid_past_is_replaced_from_the_defaults(  # type: ignore[no-untyped-def]
    etcd: Etcd, cli
) -> None:
    """Written by other means than `fluster spec`, an invalid spec must not lock the service's
    spec for good: the write compares the invalid key's own revision and says what it replaced."""
    etcd.put(SPEC_KEY, "garbage")
    code, out, err = cli("spec", "web")
    assert code == 0 and json.loads(out) == ServiceSpec().to_dict()
    assert "web: the spec in etcd is invalid (spec: " in err and "shown: the defaults" in err
    code, out, err = cli("spec", "web", "--host", "web.example.com")
    assert code == 0, err
    assert "replaced an invalid spec (spec: " in err and "starting from the defaults" in err
    assert len(err.splitlines()) == 1, err
    assert spec_of(etcd, "web") == ServiceSpec(hosts=("web.example.com",))
    code, _, err = cli("spec", "web", "--check", "/")
    assert code == 0 and "invalid" not in err  # valid now: nothing more to say

    # With instances (the service exists), and for the other spec writers.
    register(etcd, "web", "a", "v1")
    etcd.put(SPEC_KEY, '{"active_version": 7}')
    code, _, err = cli("promote", "web", "v1", "--no-wait")
    assert code == 0, err
    assert "replaced an invalid spec (active_version: " in err
    assert spec_of(etcd, "web").active_version == "v1"


def test_an_invalid_spec_over_a_promotion_is_replaced_from_the_last_valid_one(  # type: ignore[no-untyped-def]
    etcd: Etcd, cli
) -> None:
    register(etcd, "web", "a", "v1")
    register(etcd, "web", "b", "v2")
    assert cli("promote", "web", "v1", "--no-wait")[0] == 0
    assert cli("promote", "web", "v2", "--keep-old", "0s", "--no-wait")[0] == 0
    promoted = spec_revision(etcd)
    etcd.put(SPEC_KEY, "garbage")
    etcd.put(SPEC_KEY, '{"mode": "udp"}')  # two bad writes: history is read past both

    code, _, err = cli("gc", "web")  # what is "old" cannot be told from an invalid spec
    assert code == 4 and "its spec in etcd is invalid (mode: " in err, err
    assert cli("spec", "web")[2].endswith(f"shown: the last valid spec (revision {promoted})\n")
    code, _, err = cli("canary", "web", "v1", "--weight", "10", "--no-wait")
    assert code == 0, err
    assert f"starting from the last valid spec (revision {promoted})" in err
    spec = spec_of(etcd, "web")  # the promotion is not undone by the garbage
    assert (spec.active_version, spec.history) == ("v2", ("v1",))
    assert spec.canary and (spec.canary.version, spec.canary.weight) == ("v1", 10)

    # Written over again, the rollback starts from the last valid spec too.
    etcd.put(SPEC_KEY, "garbage")
    code, _, err = cli("rollback", "web", "--no-wait")
    assert code == 0 and "replaced an invalid spec" in err, err
    assert (spec_of(etcd, "web").active_version, spec_of(etcd, "web").canary) == ("v1", None)

    # History compacted away: the defaults, said so.
    etcd.put(SPEC_KEY, "garbage")
    etcd.compact()
    code, _, err = cli("spec", "web", "--check", "/")
    assert code == 0 and "starting from the defaults" in err, err
    assert spec_of(etcd, "web").active_version is None


async def test_a_write_over_an_invalid_spec_still_compares_what_it_read(etcd: Etcd) -> None:
    etcd.put(SPEC_KEY, "garbage")
    async with open_store(EtcdSettings(endpoints=etcd.endpoint_list)) as store:
        _, svc, invalid = await ops.read_for_write(store, PREFIX, "web")
        assert svc is not None and invalid is not None and invalid.reason.startswith("spec: ")
        etcd.put(SPEC_KEY, "other garbage")  # someone else wrote in between
        with pytest.raises(Conflict):
            await ops.write_spec(store, PREFIX, svc, svc.spec.replace(balance="first"))
    assert etcd.ctl("get", "--print-value-only", SPEC_KEY).stdout.strip() == "other garbage"


def _paths(commands: tuple[object, ...], above: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for command in commands:
        path = (*above, command.name)  # type: ignore[attr-defined]
        out.append(path)
        out += _paths(command.actions, path)  # type: ignore[attr-defined]
    return out


def test_every_command_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` of every command and action prints its options (a `%` in a default once
    broke argparse's formatting of a whole command's help)."""
    from fluster.cli import COMMANDS, main

    for path in _paths(COMMANDS):
        with pytest.raises(SystemExit) as done:
            main([*path, "--help"], environ={})
        assert done.value.code == 0, path
        assert f"usage: fluster {' '.join(path)}" in capsys.readouterr().out.replace("\n", " ")
