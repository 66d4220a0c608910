"""The deployer's pure parts: app config validation, deploy records, pre-receive input,
the hook script, and what the deploy key's forced command lets through."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deployer import deploykeys, gitshell, source
from deployer.apps import deploy_id
from deployer.dockerfile import images as dockerfile_images
from deployer.engine import DeployError
from deployer.records import AppConfig, DeployRecord, Stage
from fluster.records import RecordError
from fluster.text import printable

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
        ({"memory": "lots"}, "memory"),
        ({"memory": "1k"}, "memory"),
        ({"cpus": -1}, "cpus"),
        ({"volumes": ["/etc:/etc"]}, "volumes"),
        ({"volumes": ["data:relative"]}, "volumes"),
        ({"volumes": ["data:/a/../etc"]}, "volumes"),
        ({"volumes": ["a:/x", "b:/x"]}, "volumes"),
        ({"release_command": "one\ntwo"}, "release_command"),
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
    assert gitshell.allowed(command.format(repos=repos), repos, ("web",)) == repos / "web.git"


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
        gitshell.allowed(command.format(repos=repos), repos, ("web", "other"))


def test_git_shell_lets_a_key_push_its_own_apps_only(repos: Path) -> None:
    push = f"git-receive-pack '{repos}/web.git'"
    with pytest.raises(gitshell.Refused, match="may not push web"):
        gitshell.allowed(push, repos, ("api",))
    with pytest.raises(gitshell.Refused, match="not a deploy key of any app"):
        gitshell.allowed(push, repos, None)
    # Another app's refusal does not say whether it exists.
    with pytest.raises(gitshell.Refused, match="may not push ghost"):
        gitshell.allowed(f"git-receive-pack '{repos}/ghost.git'", repos, ("api",))


def test_deploy_keys_add_ls_rm_keep_other_lines(tmp_path: Path) -> None:
    def pub(name: str) -> str:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)],
            check=True,
        )
        return (tmp_path / f"{name}.pub").read_text()

    path = tmp_path / "authorized_keys"
    path.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHand written-by-root\n")
    keys = deploykeys.KeyFile(path)
    alice, bob = pub("alice"), pub("bob")
    fluster = ["/usr/bin/fluster"]
    keys.add("web", "alice", alice, fluster, "/srv/repos")
    keys.add("api", "alice", alice, fluster, "/elsewhere")  # the line keeps its --repos
    keys.add("web", "bob", bob, fluster, "/srv/repos")
    granted = {k.name: k for k in keys.granted()}
    assert granted["alice"].apps == ("web", "api") and granted["bob"].apps == ("web",)
    assert granted["alice"].repos == "/srv/repos"
    with pytest.raises(deploykeys.KeyProblem, match="already deploy key bob"):
        keys.add("web", "carol", bob, fluster, "/srv/repos")
    with pytest.raises(deploykeys.KeyProblem, match="a different public key"):
        keys.add("web", "alice", bob, fluster, "/srv/repos")
    with pytest.raises(deploykeys.KeyProblem, match="not an OpenSSH public key"):
        keys.add("web", "eve", "-----BEGIN OPENSSH PRIVATE KEY-----", fluster, "/srv/repos")
    with pytest.raises(deploykeys.KeyProblem, match="key name"):
        keys.add("web", "eve; id", alice, fluster, "/srv/repos")
    keys.remove("web", "alice")
    keys.remove("web", "bob")
    lines = path.read_text().splitlines()
    assert lines[0].endswith("written-by-root"), "a line fluster did not write was changed"
    assert [k.name for k in keys.granted()] == ["alice"]
    assert "--apps api" in lines[1] and 'command="/usr/bin/fluster git-shell' in lines[1]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(deploykeys.KeyProblem, match="no deploy key bob"):
        keys.remove("web", "bob")


@pytest.mark.parametrize(
    ("dockerfile", "images"),
    [
        ("FROM debian:bookworm-slim\nRUN true\n", ["debian:bookworm-slim"]),
        ("from --platform=linux/amd64 python:3.11 AS build\nFROM build\n", ["python:3.11"]),
        ("FROM a AS one\nFROM b\nCOPY --from=one /x /x\nCOPY --from=0 /y /y\n", ["a", "b"]),
        ("FROM a\nCOPY --chown=1 --from=reg/other:1 /s /s\n", ["a", "reg/other:1"]),
        ("ARG BASE=reg/other:1\nFROM ${BASE}\n", ["reg/other:1"]),
        ("# escape=`\nFROM a `\n  AS b\nFROM b\n", ["a"]),
        ("FROM \\\n# a comment inside\n  reg/x:1\n", ["reg/x:1"]),
        ("FROM scratch\nCOPY app /app\n", []),
    ],
)
def test_dockerfile_images_are_every_base_a_build_uses(dockerfile: str, images: list[str]) -> None:
    assert [ref.image for ref in dockerfile_images(dockerfile)] == images


@pytest.mark.parametrize(
    ("dockerfile", "message"),
    [
        ("RUN true\n", "no FROM"),
        ("FROM $NOPE\n", "has no default"),
        ("ARG X=1\nFROM a\nARG Y=b\nFROM $Y\n", "has no default"),
    ],
)
def test_dockerfile_images_refuse_what_they_cannot_pin_down(dockerfile: str, message: str) -> None:
    with pytest.raises(DeployError, match=message):
        dockerfile_images(dockerfile)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain words", "plain words"),
        ("\x1b]0;pwned\x07\x1b[2J\x1b[31mRED\x1b[0m", "RED"),
        ("a\tb\rc\x00d\x7fe", "a bcde"),
        ("evil\u202etxt.exe", "eviltxt.exe"),
        ("\x9b31mx", "x"),
        ("caf\u00e9 \u2603", "caf\u00e9 \u2603"),
    ],
)
def test_printable_drops_escapes_and_control_characters(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert printable("one\x1b[1m\ntwo", keep_newlines=True) == "one\ntwo"


def test_secrets_are_never_shown() -> None:
    config = AppConfig.from_dict({"service": "web", "secrets": {"DB": "hunter2"}})
    assert "hunter2" not in str(config.shown()) and config.shown()["secrets"] == {"DB": "(secret)"}
    assert config.environment == {"DB": "hunter2"}
    assert AppConfig.parse(config.to_json()).secrets == {"DB": "hunter2"}


@pytest.mark.parametrize("keep_old", ["99999999d", "inf", "nan", "-1m", "10 minutes", ""])
def test_a_keep_old_a_promotion_could_not_use_is_refused_at_config(keep_old: str) -> None:
    """Validated the way the promotion parses it: a value that used to pass `app config`
    and fail mid-deploy with an OverflowError is refused where it enters."""
    with pytest.raises(RecordError, match="keep_old"):
        AppConfig.from_dict({"service": "web", "keep_old": keep_old})
    assert AppConfig.from_dict({"service": "web", "keep_old": "3650d"}).keep_old == "3650d"


def test_limits_and_volumes_parse_and_shape_the_container() -> None:
    from deployer import oneoff

    config = AppConfig.from_dict(
        {"service": "web", "memory": "256m", "cpus": 1.5, "volumes": ["data:/data:ro"]}
    )
    assert oneoff.limits("web", config) == {
        "Memory": 256 << 20,
        "NanoCpus": 1_500_000_000,
        "Mounts": [{"Type": "volume", "Source": "web-data", "Target": "/data", "ReadOnly": True}],
    }
    assert oneoff.limits("web", AppConfig(service="web")) == {}


@pytest.mark.parametrize(
    ("text", "web", "release"),
    [
        ("web: gunicorn app\nrelease: ./migrate\n", "gunicorn app", "./migrate"),
        ("# comment\n\nworker: celery\nweb:python3 -m app\n", "python3 -m app", ""),
        ("", "", ""),
    ],
)
def test_procfile_lines(text: str, web: str, release: str) -> None:
    from deployer.oneoff import Procfile

    assert Procfile.parse(text) == Procfile(web=web, release=release)


def test_a_procfile_line_that_is_not_name_command_is_refused() -> None:
    from deployer.oneoff import Procfile

    with pytest.raises(DeployError, match="line 2"):
        Procfile.parse("web: app\nrelease ./migrate\n")


def _release(
    number: int, version: str, env: dict[str, str], result: str = "succeeded"
) -> DeployRecord:
    config = AppConfig(service="web", env=env)
    return DeployRecord(
        id=f"20261130T18000{number}.000Z-{version[:7]}", app="web", kind="deploy", ref="main",
        version=version, image=f"r/web:{version[:12]}", by="dev", started="2026-11-30T18:00:00",
        result=result, number=number, runtime=config.runtime(),  # type: ignore[arg-type]
    )  # fmt: skip


def test_a_version_names_its_image_and_config() -> None:
    from deployer import apps

    red, blue = (
        AppConfig(service="web", env={"C": "red"}),
        AppConfig(service="web", env={"C": "blue"}),
    )
    history: list[DeployRecord | RecordError] = [_release(1, "aaaaaaaaaaaa", {"C": "red"})]
    image = "r/web:aaaaaaaaaaaa"
    # The same commit with the same config is the same version; with another, another.
    assert apps.version_for(history, "aaaaaaaaaaaa", red, image, "") == "aaaaaaaaaaaa"
    other = apps.version_for(history, "aaaaaaaaaaaa", blue, image, "")
    assert other.startswith("aaaaaaaaaaaa-") and other != "aaaaaaaaaaaa"
    assert apps.version_for(history, "aaaaaaaaaaaa", blue, image, "") == other  # stable
    assert apps.version_for(history, "aaaaaaaaaaaa", red, image, "gunicorn") != "aaaaaaaaaaaa"
    assert (
        apps.version_for(history, "bbbbbbbbbbbb", blue, "r/web:bbbbbbbbbbbb", "") == "bbbbbbbbbbbb"
    )


def test_releases_are_found_by_number_or_sha_and_failed_ones_take_none() -> None:
    from deployer import apps

    history: list[DeployRecord | RecordError] = [
        _release(1, "aaaaaaaaaaaa", {}),
        _release(0, "cccccccccccc", {}, result="failed"),
        _release(2, "bbbbbbbbbbbb", {}),
    ]
    assert [r.name for r in apps.releases(history)] == ["v1", "v2"]
    assert apps.next_number(history) == 3
    assert apps.find_release(history, "v1") is history[0]
    assert apps.find_release(history, "bbbbbbb") is history[2]
    assert apps.find_release(history, "v3") is None
    assert apps.find_release(history, "cccccccc") is None  # failed: not a release
    assert apps.find_release(history, "bb") is None  # too short to name one


def test_a_release_record_keeps_its_config_and_never_shows_a_secret() -> None:
    config = AppConfig(service="web", env={"A": "1"}, secrets={"DB": "hunter2"}, memory="64m")
    rec = DeployRecord(
        id="x", app="web", kind="config", ref="", version="v", image="i", by="", started="s",
        number=4, runtime=config.runtime(),
    )  # fmt: skip
    again = DeployRecord.parse(rec.to_json())
    assert again == rec and again.config(AppConfig(service="web")) == config.replace(service="web")
    shown = rec.shown()
    assert shown["release"] == "v4" and shown["runtime"]["secrets"] == {"DB": "(secret)"}
    assert "hunter2" not in str(shown)
    bad = rec.to_json().replace('"64m"', '"lots"')
    with pytest.raises(RecordError, match=r"runtime\.memory"):
        DeployRecord.parse(bad)
