"""fluster.runtime.Supervisor: pure asyncio, no real part needed."""

from __future__ import annotations

import asyncio

import pytest

from fluster.runtime import Supervisor, TaskDied


async def _forever() -> None:
    await asyncio.Event().wait()


async def _fail() -> None:
    raise RuntimeError("boom")


async def test_a_task_started_after_wait_began_that_dies_stops_the_wait() -> None:
    supervisor, stop = Supervisor(), asyncio.Event()
    waiting = asyncio.create_task(supervisor.wait(stop))
    await asyncio.sleep(0)  # let wait() begin before the task exists
    supervisor.start("late", _fail())
    with pytest.raises(TaskDied, match="late") as caught:
        await asyncio.wait_for(waiting, 5)
    assert isinstance(caught.value.__cause__, RuntimeError)


async def test_a_started_task_that_returns_is_a_death_too() -> None:
    supervisor = Supervisor()
    supervisor.start("quitter", asyncio.sleep(0))
    with pytest.raises(TaskDied, match="quitter"):
        await asyncio.wait_for(supervisor.wait(asyncio.Event()), 5)


async def test_cancelled_and_spawned_tasks_are_not_deaths() -> None:
    supervisor, stop = Supervisor(), asyncio.Event()
    owned = supervisor.start("owned", _forever())
    await supervisor.cancel(owned)
    assert owned.cancelled()
    done = supervisor.spawn("one-off", asyncio.sleep(0))
    failed = supervisor.spawn("one-off that fails", _fail())  # logged, not fatal
    await asyncio.wait([done, failed])
    stop.set()
    await asyncio.wait_for(supervisor.wait(stop), 5)  # returns: nothing died


async def test_cancel_all_cancels_what_is_left() -> None:
    supervisor = Supervisor()
    tasks = [supervisor.start("a", _forever()), supervisor.spawn("b", _forever())]
    await supervisor.cancel_all()
    assert all(t.cancelled() for t in tasks)
