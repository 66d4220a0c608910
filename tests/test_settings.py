"""Options declared once (fluster/settings.py): every bad value refused at start, with exit
status 2 and every problem listed, before anything touches etcd. Pure: no etcd runs here
(the endpoint is a closed port, so a value that slipped through would fail differently)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fluster import cli as fluster_cli
from fluster.settings import ETCD_OPTIONS, MAX_LEASE_TTL, SettingsError
from reloader import settings as reloader_settings
from sidekick import settings as sidekick_settings

NOWHERE = {"ETCD_ENDPOINTS": "127.0.0.1:1"}


def fluster(capsys: pytest.CaptureFixture[str], *argv: str, **env: str) -> tuple[int, str]:
    code = fluster_cli.main(list(argv), {**NOWHERE, **env})
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["spec", "WEB", "--mode", "tcp"], "SERVICE"),
        (["spec", "../x", "--mode", "tcp"], "SERVICE"),
        (["spec", "", "--mode", "tcp"], "SERVICE"),
        (["promote", "web", "v2", "--keep-old", "99999999999d"], "--keep-old"),
        (["promote", "web", "v2", "--min-instances", "-1"], "--min-instances"),
        (["promote", "web", "v2", "--wait-timeout", "nan"], "--wait-timeout"),
        (["promote", "web", "v2", "--wait-timeout", "-1"], "--wait-timeout"),
        (["canary", "web", "v2", "--weight", "150"], "--weight: must be 0-100"),
        (["canary", "web", "v2"], "--weight is required"),
        (["drain", "web", "bad/name"], "INSTANCE"),
        (["spec", "web", "--balance", "fastest"], "--balance"),
    ],
)
def test_fluster_refuses_bad_values_before_etcd(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    code, err = fluster(capsys, *argv)
    assert code == 2, err
    assert needle in err and "Traceback" not in err


def test_fluster_lists_every_problem_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = fluster(
        capsys,
        "promote",
        "WEB",
        "v 2",
        "--wait-timeout",
        "inf",
        ETCD_ENDPOINTS="garbage:port",
        FLUSTER_PREFIX="nope",
    )
    assert code == 2
    for needle in ("SERVICE", "VERSION", "--wait-timeout", "--etcd-endpoints", "--prefix"):
        assert needle in err, err


def test_prefix_must_be_absolute_in_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert fluster(capsys, "ls", FLUSTER_PREFIX="nope")[0] == 2
    with pytest.raises(SettingsError, match="--prefix: must start with '/'"):
        reloader_settings.load([], {"FLUSTER_PREFIX": "nope"})
    with pytest.raises(SettingsError, match="--prefix"):
        sidekick_settings.build(["--all"], {"FLUSTER_PREFIX": "/a/../b"})
    assert reloader_settings.load([], {"FLUSTER_PREFIX": "/team/fl/"}).prefix == "/team/fl"


def test_sidekick_ttl_beyond_etcds_maximum_is_refused() -> None:
    with pytest.raises(SettingsError, match="--ttl: must be 2-9000000000"):
        sidekick_settings.build(["--all", "--ttl", "99999999999"], {})
    s, _ = sidekick_settings.build(["--all", "--ttl", str(MAX_LEASE_TTL)], {})
    assert s.ttl == MAX_LEASE_TTL


def test_check_docker_needs_a_container() -> None:
    with pytest.raises(SettingsError, match="--check docker needs a container"):
        sidekick_settings.build(
            ["--service", "web", "--address", "127.0.0.1:80", "--check", "docker"], {}
        )
    s, _ = sidekick_settings.build(["--all", "--check", "docker"], {})
    assert s.check is not None and s.check.kind == "docker"


def test_reloader_log_level_is_validated_like_the_sidekicks() -> None:
    with pytest.raises(SettingsError, match="--log-level: want one of debug"):
        reloader_settings.load(["--log-level", "loud"], {})
    with pytest.raises(SettingsError, match="--log-level: want one of debug"):
        sidekick_settings.build(["--all"], {"SIDEKICK_LOG_LEVEL": "loud"})
    assert reloader_settings.load([], {"RELOADER_LOG_LEVEL": "DEBUG"}).log_level == "debug"


def test_a_boolean_variable_must_say_yes_or_no() -> None:
    with pytest.raises(SettingsError, match="--all: want true/false"):
        sidekick_settings.build([], {"SIDEKICK_ALL": "maybe"})
    assert reloader_settings.load([], {"RELOADER_NO_REMOVAL_GUARD": "yes"}).guard is False
    assert reloader_settings.load([], {"RELOADER_NO_REMOVAL_GUARD": "0"}).guard is True


def test_defaults_come_from_the_table() -> None:
    s, _ = sidekick_settings.build(["--all"], {})
    for option, value in (
        (sidekick_settings.TTL, s.ttl),
        (sidekick_settings.RISE, s.rise),
        (sidekick_settings.FALL, s.fall),
        (sidekick_settings.WEIGHT, s.weight),
        (sidekick_settings.CHECK_INTERVAL, s.check_interval),
        (sidekick_settings.DRAIN_SECONDS, s.drain_seconds),
    ):
        assert value == option.default
    r = reloader_settings.load([], {})
    assert r.removal_hold == reloader_settings.REMOVAL_HOLD.default
    assert r.status_bind == reloader_settings.STATUS_BIND.default


def _flags(options: Any) -> list[Any]:
    return [o for o in options if o.kind != "positional"]


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("sidekick.cli", sidekick_settings.OPTIONS),
        ("reloader.cli", (*reloader_settings.OPTIONS, *ETCD_OPTIONS)),
        ("fluster.cli", fluster_cli.GLOBAL),
    ],
)
def test_help_shows_every_option_with_its_variable_and_default(command: str, options: Any) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", command, "--help"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    text = "".join(proc.stdout.split())  # argparse wraps lines, also after hyphens
    for option in _flags(options):
        line = "".join(option.help_text().replace("%%", "%").split())
        assert option.flag in text and line in text, (option.flag, line)
        assert not option.env or f"[env{option.env}]" in line
        shows_default = option.shown or option.default not in (None, "", False, (), {})
        assert not shows_default or "(default:" in line or option.required, line


def test_etcd_tls_files_must_be_pem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage\n")
    code, err = fluster(capsys, "ls", ETCD_CACERT=str(bad))
    assert code == 2 and "--etcd-cacert: not a PEM file" in err, err


def test_every_fluster_subcommand_explains_each_option(capsys: pytest.CaptureFixture[str]) -> None:
    commands = [
        ([c.name, *([a.name] if a else [])], (*c.options, *(a.options if a else ())))
        for c in fluster_cli.COMMANDS
        for a in (c.actions or (None,))
    ]
    for argv, options in commands:
        with pytest.raises(SystemExit) as done:
            fluster_cli.main([*argv, "--help"], {})
        assert done.value.code == 0
        text = "".join(capsys.readouterr().out.split())
        for option in options:
            line = "".join(option.help_text().replace("%%", "%").split())
            assert line in text, (argv, option.flag)
