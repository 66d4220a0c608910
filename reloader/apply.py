"""Rendered config -> running HAProxy: nothing, the runtime API, or a checked reload.

1. same text as live: nothing;
2. same structure, server changes only: the runtime API (HAProxy vets every server it
   is asked to add), then, in the background, `haproxy -c` on the candidate, which then
   replaces the live file so that any later reload or restart reproduces the state. A
   newer apply supersedes a check still running (its file holds everything the older
   one did), so a burst of changes never queues behind a full parse of a large config.
   A refused file undoes the API's changes by a reload of the last installed file;
3. otherwise: `haproxy -c` first (the exit code is the verdict), dump server state,
   rename the candidate over the live file (atomic), ask the master to reload, wait for
   the new worker; on failure put the last good file back and reload that.

An invalid candidate is kept as `haproxy.cfg.rejected` with HAProxy's error text in
`haproxy.cfg.rejected.txt`; the live config keeps serving and the next change retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from reloader.haproxy import Haproxy, HaproxyError, check_config, cli
from reloader.model import Model
from reloader.render import Rendered
from reloader.runtime_api import RuntimeApi, plan

log = structlog.get_logger("reloader.apply")

Kind = Literal["noop", "runtime", "reload"]


class Rejected(Exception):
    """The candidate config failed `haproxy -c`; nothing was changed."""


class ApplyFailed(Exception):
    """HAProxy did not take a valid config; the last good one was restored."""


@dataclass(frozen=True, slots=True)
class Live:
    rendered: Rendered


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def filter_server_state(dump: str, model: Model) -> str:
    """Keep state lines only for servers the new config has with the same address and
    weight: for the others the state file would override the new config's values."""
    wanted = {
        (b.name, s.name): (s.host, str(s.port), str(s.weight))
        for b in model.backends
        for s in b.servers
    }
    out: list[str] = []
    for line in dump.splitlines():
        fields = line.split()
        if not line.strip() or line.startswith("#") or len(fields) < 19:
            out.append(line)
            continue
        backend, server, addr, uweight, port = (
            fields[1],
            fields[3],
            fields[4],
            fields[7],
            fields[18],
        )
        if wanted.get((backend, server)) == (addr, port, uweight):
            out.append(line)
    return "\n".join(out) + "\n"


class Applier:
    def __init__(self, haproxy: Haproxy, binary: str, state_dir: Path, admin_socket: Path) -> None:
        self.haproxy = haproxy
        self.binary = binary
        self.state_dir = state_dir
        self.admin_socket = admin_socket
        self.live_file = state_dir / "haproxy.cfg"
        self.candidate = state_dir / "haproxy.cfg.candidate"
        self.rejected = state_dir / "haproxy.cfg.rejected"
        self.last_good = state_dir / "haproxy.cfg.last-good"
        self.state_file = state_dir / "server-state"
        self.routes_file = state_dir / "routes.map"
        self.runtime = RuntimeApi(admin_socket)
        self.live: Rendered | None = None
        self.on_late_rejection: Callable[[str], None] | None = None
        self._file_task: asyncio.Task[None] | None = None
        self._checking = False  # the file task is inside `haproxy -c`: safe to cancel
        self._installed: Rendered | None = None  # what the live file holds

    async def admin(self, command: str) -> str:
        return await cli(self.admin_socket, command)

    async def validate(self, text: str) -> None:
        error = await check_config(self.binary, self._write_candidate(text))
        if error is None:
            return
        self._keep_rejected(text, error)
        raise Rejected(error)

    def _write_candidate(self, text: str) -> Path:
        write_atomic(self.candidate, text)
        return self.candidate

    def _keep_rejected(self, text: str, error: str) -> None:
        write_atomic(self.rejected, text)
        write_atomic(self.rejected.with_name(self.rejected.name + ".txt"), error + "\n")

    async def initial(self, rendered: Rendered) -> None:
        """Before HAProxy starts: validate and install the first config."""
        if not self.state_file.exists():
            self.state_file.write_text("1\n")  # the format version, no servers
        write_atomic(self.routes_file, rendered.routes)
        await self.validate(rendered.text)
        os.replace(self.candidate, self.live_file)
        write_atomic(self.last_good, rendered.text)
        self.live = self._installed = rendered

    async def initial_from_file(self, placeholder: Rendered) -> bool:
        """Adopt the live file of a previous run if it is still valid.

        Its structure is unknown to us, so the first real apply is a reload.
        """
        if not self.live_file.is_file():
            return False
        if await check_config(self.binary, self.live_file) is not None:
            return False
        text = self.live_file.read_text()
        routes = self.routes_file.read_text() if self.routes_file.is_file() else ""
        self.live = self._installed = Rendered(
            text, "(a previous run's config)", placeholder.model, routes
        )
        return True

    async def apply(self, rendered: Rendered) -> Kind:
        await self._supersede()
        live = self.live
        assert live is not None, "initial() first"
        if rendered.text == live.text and rendered.routes == live.routes:
            await self._retry_pending()
            return "noop"
        touched = False
        if rendered.skeleton == live.skeleton and rendered.routes == live.routes:
            changes = plan(live.model, rendered.model)
            if changes is not None:
                # Same structure as a validated config, servers from re-checked values, and
                # HAProxy vets every server the API adds: the API goes first, and `haproxy
                # -c` (a fork and a full parse, ~50-100 ms on a busy host) guards the file
                # off the latency path, overlapping the next debounce period.
                touched = True
                try:
                    await self.runtime.apply(changes)
                except HaproxyError as exc:
                    log.warning("runtime API apply failed, reloading instead", error=str(exc))
                else:
                    self.live = rendered
                    self._file_task = asyncio.create_task(
                        self._install(rendered), name="install-config"
                    )
                    return "runtime"
        if touched:
            await self._validate_or_restore(rendered.text)
        else:
            await self.validate(rendered.text)
        await self._reload(rendered)
        return "reload"

    async def flush(self) -> None:
        """Wait until the file of the last runtime apply is checked and installed."""
        task, self._file_task = self._file_task, None
        if task is not None:
            await task

    async def _supersede(self) -> None:
        """Before a new apply: drop a check still running (the new apply's file will hold
        all it held), or wait for a file task past its check (installing or undoing)."""
        task, self._file_task = self._file_task, None
        if task is None:
            return
        if self._checking:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _install(self, rendered: Rendered) -> None:
        try:
            self._checking = True
            try:
                error = await check_config(self.binary, self._write_candidate(rendered.text))
            finally:
                self._checking = False
            if error is not None:
                self._keep_rejected(rendered.text, error)
                log.error("config refused after runtime changes, reloading the live config")
                with contextlib.suppress(HaproxyError):
                    await self.haproxy.reload()
                self.runtime.forget()
                raise Rejected(error)
        except Rejected as exc:
            self.live = self._installed  # what HAProxy runs again after the undoing reload
            if self.on_late_rejection is not None:
                self.on_late_rejection(str(exc))
            return
        write_atomic(self.routes_file, rendered.routes)
        os.replace(self.candidate, self.live_file)
        write_atomic(self.last_good, rendered.text)
        self._installed = rendered

    async def _validate_or_restore(self, text: str) -> None:
        """Validate after runtime changes; if invalid, reload the live file (which still
        holds the previous config) to undo them."""
        try:
            await self.validate(text)
        except Rejected:
            log.error("config refused after runtime changes, reloading the live config")
            with contextlib.suppress(HaproxyError):
                await self.haproxy.reload()
            self.runtime.forget()
            raise

    async def _retry_pending(self) -> None:
        with contextlib.suppress(HaproxyError):
            await self.runtime.retry_pending()

    async def _save_server_state(self, model: Model) -> None:
        try:
            dump = await self.admin("show servers state")
        except HaproxyError as exc:
            log.warning("could not save server state before reload", error=str(exc))
            return
        write_atomic(self.state_file, filter_server_state(dump, model))

    async def _reload(self, rendered: Rendered) -> None:
        assert self._installed is not None
        await self._save_server_state(rendered.model)
        # The map's values are only backend names and its keys safe tokens: it cannot make
        # a config invalid, so the one validated beside the old map is valid with the new.
        write_atomic(self.routes_file, rendered.routes)
        os.replace(self.candidate, self.live_file)
        try:
            await self.haproxy.reload()
        except HaproxyError as exc:
            log.error("reload failed, restoring the last good config", error=str(exc))
            write_atomic(self.routes_file, self._installed.routes)
            write_atomic(self.live_file, self._installed.text)
            self.live = self._installed
            try:
                await self.haproxy.reload()
            except HaproxyError as again:
                log.error("reload of the last good config failed too", error=str(again))
            raise ApplyFailed(str(exc)) from exc
        finally:
            self.runtime.forget()
        write_atomic(self.last_good, rendered.text)
        self.live = self._installed = rendered

    def restarted(self) -> None:
        """HAProxy was restarted from the live file: nothing is pending any more, and
        what runs is that file, which the next apply reloads if it differs."""
        self.runtime.forget()
        if self.live is not None and self.live_file.read_text() != self.live.text:
            text = self.live_file.read_text()
            routes = self.routes_file.read_text() if self.routes_file.is_file() else ""
            self.live = Rendered(text, "(restarted from the live file)", self.live.model, routes)
        self._installed = self.live
