"""pytest fixtures for a real etcd, and the waits every test uses.

The etcd runner itself (`Etcd`, `Member`, `free_port`) is testbed/etcd.py and the wait
(`wait_for`, `GaveUp`) testbed/waiting.py, shared with the bench; they are re-exported
here for the tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fluster.cli import main
from testbed.etcd import Etcd, Member
from testbed.ports import free_port
from testbed.waiting import GaveUp, wait_for
from tests.support import waiting

__all__ = ["Etcd", "GaveUp", "Member", "eventually", "free_port", "wait_for"]


async def eventually(
    predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
):  # type: ignore[no-untyped-def]
    """Async `wait_for`: poll `predicate` (sync or async) on the running loop."""
    import asyncio
    import inspect

    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last: object = waiting.NOTHING
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            last = value
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        await asyncio.sleep(interval)
    raise waiting.timed_out(what, timeout, last, last_exc)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    """A fresh single-member etcd for one test."""
    cluster = Etcd(tmp_path / "etcd").start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[Etcd]:
    """A fresh 3-member etcd cluster for one test."""
    cluster = Etcd(tmp_path / "etcd", size=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cli(etcd: Etcd, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`fluster ARGS` run in this process against the `etcd` fixture: (exit code, out, err)."""

    def call(*args: str) -> tuple[int, str, str]:
        code = main(list(args), {"ETCD_ENDPOINTS": etcd.endpoints})
        out = capsys.readouterr()
        return code, out.out, out.err

    return call
