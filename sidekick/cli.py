"""`sidekick`: the entry point. Settings, logging, the loop, signals, orderly shutdown.

Shutdown order (STYLE.md, habit 3): stop following Docker, drain and deregister every
record (bounded by the drain period plus a margin), then close etcd. Exit 0 after a
SIGTERM, 1 if a task that should run forever died, 2 for bad settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from fluster.docker import Docker
from fluster.runtime import (
    Supervisor,
    TaskDied,
    capture_signals,
    return_free_memory,
    run,
    setup_logging,
)
from fluster.settings import SettingsError, exit_on_problems, make_directory
from fluster.store import Store, StoreError, open_store, retry_backoff, retry_cap
from sidekick import status
from sidekick.agent import Sidekick
from sidekick.plan import PlanError, detect_ip, node_name
from sidekick.settings import Settings, build

log = structlog.get_logger("sidekick")


STARTED_WITHIN = 5.0  # seconds


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, status_check = build(argv, os.environ)
    except SettingsError as exc:
        exit_on_problems(exc)
    if status_check:
        if settings.mode_given:
            ok, reason = status.check(settings.state_dir / settings.status_name)
        else:
            ok, reason = status.check_all(settings.state_dir)
        print(reason, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    problem = make_directory(settings.state_dir, "--state-dir")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    return run(serve(settings), fast_loop=False)


async def serve(s: Settings) -> int:
    stop = asyncio.Event()
    store = open_store(s.etcd, preferred="http")
    docker = Docker(s.docker_host) if s.mode != "static" else None
    # Docker modes learn the node name from dockerd (the host's name even when the
    # sidekick itself runs in a container) unless --node says otherwise.
    node = node_name(s.node) if s.node or s.mode == "static" else ""
    supervisor = Supervisor()
    sidekick = Sidekick(s, store, docker, node, s.advertise_ip or detect_ip(), supervisor)
    status_path = s.state_dir / s.status_name
    intake: list[asyncio.Task[Any]] = []
    code = 0
    log.info(
        "sidekick starting",
        mode=s.mode,
        node=node or "(from docker)",
        ttl=s.ttl,
        endpoints=",".join(s.etcd.endpoints),
        prefix=s.prefix,
    )
    with capture_signals(stop):
        try:
            await connect(store, stop)
            if s.mode == "static":
                sidekick.start_static()
            else:
                intake.append(supervisor.start("docker events", sidekick.follow_docker()))
            intake.append(
                supervisor.start("status file", write_status(sidekick, status_path, s.ttl / 3))
            )
            # Start-up is over within seconds; what it freed need not stay resident.
            asyncio.get_running_loop().call_later(STARTED_WITHIN, return_free_memory)
            await supervisor.wait(stop)
        except PlanError as exc:
            log.error("cannot register", error=str(exc))
            code = 2
        except TaskDied:
            code = 1
        finally:
            await supervisor.cancel(*intake)  # no new registrations while we drain
            await sidekick.shutdown()
            await supervisor.cancel_all()
            with contextlib.suppress(OSError):
                status_path.unlink()
            if docker is not None:
                await docker.close()
            with contextlib.suppress(StoreError):
                await store.close()
    log.info("sidekick stopped", code=code)
    return code


async def connect(store: Store, stop: asyncio.Event) -> None:
    """Set up the etcd channel; with a user, authenticate (retried: etcd may be down)."""
    backoff = retry_backoff()
    while not stop.is_set():
        try:
            await store.connect()
            return
        except StoreError as exc:
            log.warning(
                "cannot connect to etcd, retrying", error=str(exc), attempt=backoff.attempt + 1
            )
            await backoff.sleep(stop, cap=retry_cap(exc))


async def write_status(sidekick: Sidekick, path: os.PathLike[str], every: float) -> None:
    """Refresh the `--check` status file forever (a local write, no etcd request)."""
    from pathlib import Path

    while True:
        try:
            status.write(Path(path), sidekick.registrations(), every)
        except OSError as exc:
            log.warning("cannot write status file", path=str(path), error=str(exc))
        await asyncio.sleep(every)


if __name__ == "__main__":
    sys.exit(main())
