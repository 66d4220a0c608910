"""The deployer's pure parts: app config validation, deploy records, pre-receive input,
the hook script, and what the deploy key's forced command lets through."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deployer import gitshell, source
from deployer.apps import deploy_id
from deployer.records import AppConfig, DeployRecord, Stage
from fluster.records import RecordError

SHA_A, SHA_B = "a" * 40, "b" * 40


def test_app_config_defaults_and_round_trip() -> None:
    config = AppConfig.from_dict({"service": "web"})
    assert (config.replicas, config.port, config.check, config.branch) == (
        2,
        8000,
        "http:/health",
        "main",
    )
    again = AppConfig.parse(config.replace(env={"A": "1"}, replicas=3).to_json())
    assert again.env == {"A": "1"} and again.replicas == 3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": True}, "replicas"),
        ({"port": 70000}, "port"),
        ({"check": "http:health"}, "check"),
        ({"check": "exec:/bin/sh"}, "check"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"env": {"OK": "line\nbreak"}}, "env.OK"),
        ({"branch": "-rf"}, "branch"),
        ({"keep_old": "forever"}, "keep_old"),
        ({"scheduler": "k8s"}, "scheduler"),
        ({"service": "Web"}, "service"),
        ({"health_timeout": 0}, "health_timeout"),
    ],
)
def test_app_config_refuses_bad_fields(change: dict[str, object], field: str) -> None:
    with pytest.raises(RecordError) as err:
        AppConfig.from_dict({"service": "web", **change})
    assert err.value.field == field


def test_deploy_record_round_trip_and_stage_seconds() -> None:
    rec = DeployRecord(
        id="20261130T180000.000Z-aaaaaaa",
        app="web",
        kind="deploy",
        ref=SHA_A,
        version=SHA_A[:12],
        image="127.0.0.1:5000/web:" + SHA_A[:12],
        by="dev@host",
        started="2026-11-30T18:00:00.000+00:00",
        stages=(Stage("build", "2026-11-30T18:00:00.000+00:00", "2026-11-30T18:00:02.500+00:00"),),
        result="succeeded",
    )
    again = DeployRecord.parse(rec.to_json())
    assert again == rec
    assert again.stages[0].seconds == 2.5


def test_deploy_ids_sort_by_time() -> None:
    from datetime import UTC, datetime

    first = deploy_id(datetime(2026, 11, 30, 9, 5, 1, 5000, tzinfo=UTC), SHA_B)
    second = deploy_id(datetime(2026, 11, 30, 18, 0, 0, tzinfo=UTC), SHA_A)
    assert first == "20261130T090501.005Z-bbbbbbb"
    assert sorted([second, first]) == [first, second]


def test_pushed_picks_the_deployed_branch_only() -> None:
    lines = [
        f"{SHA_A} {SHA_B} refs/heads/feature",
        f"{source.ZERO} {SHA_B} refs/tags/v1",
        f"{SHA_A} {SHA_B} refs/heads/main",
    ]
    update = source.pushed(lines, "main")
    assert update == source.Update(SHA_A, SHA_B, "refs/heads/main")
    assert source.pushed(lines[:2], "main") is None
    assert source.pushed([f"{SHA_A} {source.ZERO} refs/heads/main"], "main") is None  # delete


def test_hook_script_is_shell_safe(tmp_path: Path) -> None:
    hook = source.hook_script("web", ["/opt/my venv/bin/fluster"], {"ETCD_ENDPOINTS": "a:1;rm"})
    script = tmp_path / "hook"
    script.write_text(hook.replace("exec ", "printf '%s\\n' "))
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[:3] == ["/opt/my venv/bin/fluster", "deploy", "web"]
    assert "export ETCD_ENDPOINTS='a:1;rm'" in hook


@pytest.fixture
def repos(tmp_path: Path) -> Path:
    repo = tmp_path / "repos" / "web.git"
    (repo / "hooks").mkdir(parents=True)
    (repo / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "hooks" / "pre-receive").write_text("#!/bin/sh\n")
    return tmp_path / "repos"


@pytest.mark.parametrize(
    "command",
    [
        "git-receive-pack '{repos}/web.git'",
        "git receive-pack '{repos}/web.git'",
        "git-receive-pack 'web.git'",
        "git-receive-pack '/web.git'",
        "git-receive-pack 'web'",
    ],
)
def test_git_shell_lets_a_push_to_an_app_through(repos: Path, command: str) -> None:
    assert gitshell.allowed(command.format(repos=repos), repos) == repos / "web.git"


@pytest.mark.parametrize(
    "command",
    [
        "",
        "id",
        "sh -c 'id'",
        "git-upload-pack '{repos}/web.git'",
        "git-receive-pack '{repos}/other.git'",
        "git-receive-pack '{repos}/../repos/web.git'",
        "git-receive-pack '/etc/web.git'",
        "git-receive-pack '{repos}/web.git' extra",
        "git-receive-pack '{repos}/web.git; id'",
        "git-receive-pack 'unterminated",
    ],
)
def test_git_shell_refuses_anything_else(repos: Path, command: str) -> None:
    with pytest.raises(gitshell.Refused):
        gitshell.allowed(command.format(repos=repos), repos)
