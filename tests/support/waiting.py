"""Every wait of a test names where the logs of the processes it started are kept.

`wait_for` and `eventually` (testbed/waiting.py, tests/support/etcd.py) end a test that
waited in vain with what was awaited, the predicate's last answer, and the directory
holding the logs of every process the test started: its `tmp_path` (pytest keeps the
last three runs), which this fixture hands to testbed/waiting.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.waiting import NOTHING, Compared, set_log_dir, timed_out

__all__ = ["NOTHING", "Compared", "timed_out"]


@pytest.fixture(autouse=True)
def _remember_log_dir(tmp_path: Path) -> Iterator[None]:
    """Every process a test starts logs under its tmp_path (reloader.log, etcd/, ...)."""
    set_log_dir(tmp_path)
    yield
    set_log_dir(None)
