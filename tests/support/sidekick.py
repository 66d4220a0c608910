"""The `sidekicks` fixture; the runner itself is testbed/sidekick.py, shared with the bench."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.etcd import Etcd
from testbed.sidekick import SidekickProcess, Sidekicks

__all__ = ["SidekickProcess", "Sidekicks", "sidekicks"]


@pytest.fixture
def sidekicks(etcd: Etcd, tmp_path: Path) -> Iterator[Sidekicks]:
    runner = Sidekicks(etcd, tmp_path)
    try:
        yield runner
    finally:
        runner.close()
