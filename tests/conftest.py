"""Fixtures shared by every test module live in tests/support/, one module per real part."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.support.waiting",  # first: the others import it
    "tests.support.etcd",
    "tests.support.haproxy",
    "tests.support.rbac",
    "tests.support.docker",
    "tests.support.sidekick",
    "tests.support.swarm",
]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, a short temporary root of this checkout's own: HAProxy's unix
    sockets live in each test's directory, and a path longer than 107 bytes cannot be
    bound (the default root adds `pytest-of-USER/pytest-N/popen-gwN/`)."""
    if config.option.basetemp or not getattr(config.option, "numprocesses", None):
        return
    checkout = hashlib.sha1(str(config.rootpath).encode()).hexdigest()[:6]
    config.option.basetemp = str(Path(tempfile.gettempdir()) / f"fluster-tests-{checkout}")
