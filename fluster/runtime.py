"""What every fluster process needs around its loop: logs, signals, tasks, retries.

- `setup_logging`: structlog, JSON lines when stdout is not a terminal.
- `run`: one asyncio loop (uvloop when installed) around a component's main coroutine.
- `capture_signals`: SIGTERM/SIGINT only set an event; the work happens in tasks.
- `Supervisor`: every background task; one meant to run forever that ends or fails
  stops the process loudly, also when started late; one-off tasks are logged if they fail.
- `Backoff`: the one retry delay policy (exponential, capped, jittered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import sys
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog

log = structlog.get_logger("fluster.runtime")


class _Stdio:
    """sys.stdout or sys.stderr as it is at each write, not as it was at configuration:
    structlog caches loggers on first use, and whoever swaps the stream later (pytest's
    capture, a daemoniser) must not leave them writing to a closed file."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return int(getattr(sys, self.name).write(text))

    def flush(self) -> None:
        getattr(sys, self.name).flush()

    def isatty(self) -> bool:
        return bool(getattr(sys, self.name).isatty())


def setup_logging(
    level: str = "info", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog; `json=None` picks JSON unless the stream is a TTY."""
    out: Any = (
        _Stdio("stderr" if stream is sys.stderr else "stdout")
        if stream in (None, sys.stdout, sys.stderr)
        else stream
    )
    as_json = not out.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info
            if as_json
            else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def run(main: Coroutine[Any, Any, int], *, fast_loop: bool = True) -> int:
    """Run `main` on uvloop when it is installed and `fast_loop` (the reloader's and the
    deployer's throughput), else on asyncio's own loop (the sidekick's: uvloop costs
    more memory than the sidekick's whole event loop ever needs)."""
    if fast_loop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a declared dependency
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's `malloc_trim`).

    Start-up (imports, the argument parser, the first connections) leaves freed memory
    in glibc's heap, which keeps it for a process that will never need it again; for the
    sidekick, which runs beside every container, that is half a megabyte each
    (bench/sidekick_footprint.py). Nothing happens where there is no glibc."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def capture_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop`; a second SIGINT is left to kill the process.

    Handlers are restored on exit so tests and embedding callers are left as found.
    """
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT)

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() and sig == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("signal received, stopping", signal=sig.name)
        stop.set()

    for sig in sigs:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)


class TaskDied(Exception):
    """A task that should have run until shutdown returned or raised."""


class Supervisor:
    """Owns every background task of a process; modelled on kopf's guarded tasks.

    Two kinds: `start` a task that should run until cancelled (a watch, a health check,
    a registration's writer), `spawn` one that may end (a deregistration, a cleanup).
    A started task that returns or raises makes `wait()` raise TaskDied, also when it
    was started after `wait()` began: a background loop that quietly stops is how a
    discovery daemon ends up serving stale state for days, so we prefer to exit and let
    systemd/Docker restart us. A spawned task's failure is logged, never silent.
    Cancelling a task (its owner's decision, or shutdown) is not a death.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._died: asyncio.Future[TaskDied] | None = None

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` until cancelled; its end stops the process (see `wait`)."""
        return self._track(asyncio.create_task(coro, name=name), forever=True)

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` to its end in the background; a failure is logged."""
        return self._track(asyncio.create_task(coro, name=name), forever=False)

    def _track(self, task: asyncio.Task[Any], *, forever: bool) -> asyncio.Task[Any]:
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._ended(done, forever))
        return task

    def _ended(self, task: asyncio.Task[Any], forever: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if not forever:
            if exc is not None:
                log.error("background task failed", task=task.get_name(), error=repr(exc))
            return
        log.error("task ended unexpectedly", task=task.get_name(), error=repr(exc))
        died = self._death()
        if not died.done():
            death = TaskDied(f"task {task.get_name()} ended: {exc!r}")
            death.__cause__ = exc
            died.set_result(death)

    def _death(self) -> asyncio.Future[TaskDied]:
        if self._died is None:
            self._died = asyncio.get_running_loop().create_future()
        return self._died

    async def wait(self, stop: asyncio.Event) -> None:
        """Return when `stop` is set; raise TaskDied as soon as a started task ends."""
        died = self._death()
        stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([stopper, died], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if died.done():
            raise died.result()

    async def cancel(self, *tasks: asyncio.Task[Any], grace: float = 5.0) -> None:
        """Cancel `tasks` and wait up to `grace` seconds for them to finish."""
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)

    async def cancel_all(self, grace: float = 5.0) -> None:
        await self.cancel(*self._tasks, grace=grace)


@dataclass
class Backoff:
    """Exponential backoff with jitter: delay n is uniform in [c/2, c], c = min(cap, base*2^n).

    `attempt` counts calls since the last `reset()`, so logs can say "attempt n".
    """

    base: float = 0.1
    cap: float = 5.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self, cap: float | None = None) -> float:
        """The next delay; `cap` replaces the cap (an error that retrying will not fix
        soon earns a longer one)."""
        if cap is not None:
            self.cap = cap
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 32)))
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0

    async def sleep(self, stop: asyncio.Event | None = None, *, cap: float | None = None) -> None:
        """Sleep the next delay (see `next_delay`), waking early if `stop` is set."""
        delay = self.next_delay(cap)
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
