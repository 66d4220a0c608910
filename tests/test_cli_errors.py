"""No Python traceback reaches a user: the three commands against bad environments.

Real subprocesses, because what a user sees is the process's stdout, stderr and exit
status. The unresolvable etcd name is looked up inside a network namespace with only
loopback (`unshare -n`), so no DNS query leaves the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.etcd import Etcd

BIN = Path(sys.executable).parent


def run(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, env={**os.environ, **env}, timeout=60
    )


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


def test_a_state_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("")
    for state_dir, needle in ((afile, "is not a directory"), (afile / "sub", "cannot create")):
        reloader = run(str(BIN / "reloader"), "--state-dir", str(state_dir))
        sidekick = run(
            str(BIN / "sidekick"),
            "--service",
            "web",
            "--address",
            "127.0.0.1:8080",
            "--state-dir",
            str(state_dir),
        )
        for proc in (reloader, sidekick):
            assert proc.returncode == 2, proc.stderr
            assert "--state-dir" in proc.stderr and needle in proc.stderr, proc.stderr
            no_traceback(proc)


def isolated(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`fluster ARGS` in a network namespace with loopback only: nothing leaves the machine."""
    command = " ".join(f'"{a}"' for a in (BIN / "fluster", *args))
    return run("unshare", "-n", "sh", "-c", f"ip link set lo up; exec {command}", **env)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for unshare -n"
)
def test_an_etcd_name_that_does_not_resolve_is_a_clear_error() -> None:
    proc = isolated("ls", ETCD_ENDPOINTS="garbage")
    assert proc.returncode == 1, proc.stderr
    assert "etcd unreachable: cannot resolve etcd endpoint garbage" in proc.stderr
    no_traceback(proc)


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for unshare -n"
)
def test_a_plain_text_etcd_off_loopback_is_named(etcd: Etcd) -> None:
    """Off loopback without TLS: a warning on stderr (in a namespace with loopback only,
    so the connection fails at once and nothing leaves the machine); on loopback: none."""
    proc = isolated("ls", ETCD_ENDPOINTS="10.255.0.1:2379")
    assert "warning: etcd at 10.255.0.1:2379 is reached in plain text" in proc.stderr
    assert "ETCD_CERT" in proc.stderr
    no_traceback(proc)
    quiet = run(str(BIN / "fluster"), "ls", ETCD_ENDPOINTS=etcd.endpoints)
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr


def test_render_once_keeps_its_logs_out_of_the_config(etcd: Etcd, tmp_path: Path) -> None:
    etcd.put("/fluster/services/web/instances/a", '{"host":"127.0.0.1","port":8001}')
    etcd.put("/fluster/services/web/instances/bad", '{"host":"1.2.3.4\\nbackend x"}')
    proc = run(
        str(BIN / "reloader"),
        "render",
        "--once",
        "--log-level",
        "debug",
        ETCD_ENDPOINTS=etcd.endpoints,
        RELOADER_STATE_DIR=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "server a 127.0.0.1:8001" in proc.stdout
    logged = [line for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any("bad" in line for line in logged), proc.stderr  # the skip was logged...
    for line in proc.stdout.splitlines():  # ...and none of it is in the config
        assert not line.startswith("{"), line
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
