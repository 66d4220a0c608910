"""The Docker engine as tests and the bench use it: the `docker` CLI and the base image."""

from __future__ import annotations

import os
import shutil
import subprocess

DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else shutil.which("docker")
BASE_IMAGE = os.environ.get("BASE_IMAGE", "debian:bookworm-slim")


def docker_cmd(
    *args: str, host: str | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    assert DOCKER is not None
    cmd = [DOCKER, *(["-H", host] if host else []), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result
