"""Target model -> running HAProxy: nothing, the runtime API, or a checked reload.

1. the target laid onto the live backends (reloader/pool.py) is what runs: nothing;
2. same structure, only servers and routes map entries differ (a new plain HTTP service
   takes a pool backend): the runtime API (HAProxy vets every server it is asked to
   add). The config and map files that make a reload or restart reproduce the state are
   rendered and written later (`write_live`, once the catalog is quiet for a moment and
   at most WRITE_MAX after the first change they lack: reloader/upkeep.py), so that a
   burst of changes costs one render and one write, and a lone change none on its path. Every reload
   renders the whole model anyway, a HAProxy that died has the files written before it
   is started again, and a restarted one is reconciled at once (`restarted`). No
   `haproxy -c` here either: the structure is that of a validated config and every
   server line comes from re-checked values HAProxy just accepted. The app has the
   written file checked once the catalog is quiet (`check_live`), so a full parse never
   sits on the latency path of a change;
3. otherwise: render the canonical config (`be_<service>` names, a full pool),
   `haproxy -c` first (the exit code is the verdict), dump server state, rename the
   candidate over the live file (atomic), ask the master to reload, wait for the new
   worker; on failure put the last good file back and reload that.

An invalid candidate is kept as `haproxy.cfg.rejected` with HAProxy's error text in
`haproxy.cfg.rejected.txt`; the live config keeps serving and the next change retries.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

import structlog

from reloader.guard import service_index
from reloader.haproxy import Haproxy, HaproxyError, check_config, cli
from reloader.model import Model
from reloader.pool import Placement, free_slots, place, replace_servers
from reloader.render import Rendered, Renderer, RenderError
from reloader.runtime_api import Plan, RuntimeApi, plan, server_changes
from reloader.state_dir import StateDir

log = structlog.get_logger("reloader.apply")

Kind = Literal["noop", "runtime", "reload"]


class Rejected(Exception):
    """The candidate config failed `haproxy -c`; nothing was changed."""


class ApplyFailed(Exception):
    """HAProxy did not take a valid config; the last good one was restored."""


def write_atomic(path: Path, text: str, sync: bool = True) -> None:
    """Replace `path` by `text` atomically; `sync=False` skips the fsync (for files that
    only mirror what HAProxy already runs, rewritten at every change)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if sync:
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
    def __init__(
        self,
        haproxy: Haproxy,
        binary: str,
        files: StateDir,
        renderer: Renderer,
    ) -> None:
        self.haproxy = haproxy
        self.binary = binary
        self.renderer = renderer
        self.files = files
        self.runtime = RuntimeApi(files.admin_socket, files.routes_map)
        self.live: Rendered | None = None  # what the config and map files hold
        # What HAProxy runs beyond the files: runtime changes not yet written.
        self.pending: Model | None = None
        self.unwritten_since: float | None = None  # monotonic time of the first of those
        self.on_late_rejection: Callable[[str], None] | None = None
        self._installed: Rendered | None = None  # the last config that passed `haproxy -c`
        self.unchecked_since: float | None = None  # monotonic time of the first unchecked write
        self.checked_at = time.monotonic()  # of the last `haproxy -c` of a whole config
        self.pool_fallbacks = 0  # new services that found the pool empty and reloaded
        self.last_reason = ""  # why the last apply reloaded
        self._pool_free: tuple[Model | None, int] = (None, 0)  # memo: model -> free slots
        # The last target applied without a reload, and its placement (HAProxy runs it).
        self._placed: tuple[Model, Placement] | None = None
        self._index: tuple[Model, dict[str, list[int]]] | None = None  # see service_index

    @property
    def running(self) -> Model | None:
        """The model HAProxy runs (a placeholder when `live.known` is False)."""
        if self.live is None:
            return None
        return self.pending if self.pending is not None else self.live.model

    @property
    def known(self) -> Model | None:
        """The model HAProxy runs; None before the first config, or when what runs is a
        previous run's file (its model unknown: the next apply reloads)."""
        return self.running if self.live is not None and self.live.known else None

    @property
    def pool_free(self) -> int:
        running = self.running
        if running is None:
            return 0
        if self._pool_free[0] is not running:
            self._pool_free = (running, free_slots(running))
        return self._pool_free[1]

    async def admin(self, command: str) -> str:
        return await cli(self.files.admin_socket, command)

    async def validate(self, text: str) -> None:
        error = await check_config(self.binary, self._write_candidate(text), self.haproxy.pass_fds)
        self.checked_at = time.monotonic()
        if error is None:
            return
        self._keep_rejected(text, error)
        raise Rejected(error)

    def _write_candidate(self, text: str) -> Path:
        write_atomic(self.files.candidate, text)
        return self.files.candidate

    def _keep_rejected(self, text: str, error: str) -> None:
        write_atomic(self.files.rejected, text)
        write_atomic(self.files.rejected_reason, error + "\n")

    async def initial(self, rendered: Rendered) -> None:
        """Before HAProxy starts: validate and install the first config."""
        if not self.files.server_state.exists():
            self.files.server_state.write_text("1\n")  # the format version, no servers
        write_atomic(self.files.routes_map, rendered.routes)
        await self.validate(rendered.text)
        os.replace(self.files.candidate, self.files.config)
        write_atomic(self.files.last_good, rendered.text)
        self.live = self._installed = rendered

    async def initial_from_file(self, placeholder: Rendered) -> bool:
        """Adopt the live file of a previous run if it is still valid.

        Its structure is unknown to us, so the first real apply is a reload.
        """
        if not self.files.config.is_file():
            return False
        if await check_config(self.binary, self.files.config, self.haproxy.pass_fds) is not None:
            return False
        text = self.files.config.read_text()
        routes = self.files.routes_map.read_text() if self.files.routes_map.is_file() else ""
        self.live = self._installed = Rendered(text, placeholder.model, routes, known=False)
        return True

    async def apply(self, model: Model, tidy: bool = False) -> Kind:
        """Make HAProxy run `model`. With `tidy`, also reload when only the layout left by
        runtime changes differs (pool backends in use, emptied backends)."""
        live, running = self.live, self.running
        assert live is not None and running is not None, "initial() first"
        quick = None if tidy else self._servers_only(running, model)
        if quick is not None:
            placement, changes = quick
        elif live.known:
            placement, changes = place(running, model), None
        else:
            placement, changes = Placement(None, "a previous run's config"), None
        touched = False
        adapted = placement.model
        same = not changes if quick is not None else adapted == running
        if adapted is not None and same and not (tidy and adapted != model):
            self._placed = (model, replace(placement, model=running))
            await self._retry_pending()
            return "noop"
        if adapted is not None and not same:
            changes = changes if changes is not None else plan(running, adapted)
            if changes is not None:
                touched = True
                try:
                    await self.runtime.apply(changes)
                except HaproxyError as exc:
                    log.warning("runtime API apply failed, reloading instead", error=str(exc))
                else:
                    if quick is not None:  # the backends stay where they were
                        self._carry(running, adapted)
                    self._ran(adapted)
                    self._placed = (model, placement)
                    return "runtime"
        self._placed = None
        if placement.pool_empty:
            self.pool_fallbacks += 1
        self.last_reason = placement.reason or ("tidy" if tidy else "server settings changed")
        rendered = self.renderer.render_model(model)
        if touched:
            await self._validate_or_restore(rendered.text)
        else:
            await self.validate(rendered.text)
        await self._reload(rendered)
        return "reload"

    def service_index(self) -> dict[str, list[int]]:
        """Service -> the positions of its backends in the running model (for the
        guard's LiveServers), kept while runtime changes leave the backends in place."""
        running = self.running
        assert running is not None
        if self._index is None or self._index[0] is not running:
            self._index = (running, service_index(running.backends))
        return self._index[1]

    def _carry(self, running: Model, adapted: Model) -> None:
        """`adapted` has `running`'s backends in the same places, pool included."""
        if self._index is not None and self._index[0] is running:
            self._index = (adapted, self._index[1])
        if self._pool_free[0] is running:
            self._pool_free = (adapted, self._pool_free[1])

    def _servers_only(self, running: Model, model: Model) -> tuple[Placement, Plan] | None:
        """The placement and plan for `model` when it differs from the last model applied
        (whose placement HAProxy runs) in the servers of some backends only: the work of
        the backends that changed, not of the catalog (issue 15). None: work it out whole
        (`place`, `plan`)."""
        if self._placed is None or self._placed[1].model is not running:
            return None
        last, placed = self._placed
        found = replace_servers(placed, model, last)
        if found is None:
            return None
        adapted, changed = found
        changes = Plan()
        for slot, backend in changed:
            if not server_changes(running.backends[slot], backend, changes):
                return None
        return replace(placed, model=adapted), changes

    def _ran(self, model: Model) -> None:
        """HAProxy runs `model` after runtime changes; the files follow (`write_live`)."""
        self.pending = model
        if self.unwritten_since is None:
            self.unwritten_since = time.monotonic()

    def write_live(self) -> None:
        """The files a reload or restart would read, for the runtime changes HAProxy
        runs, unchecked (`check_live` checks them later). Should the render fail, the
        next apply reloads rather than trust the layout."""
        if self.pending is None:
            return
        assert self.live is not None
        model, self.pending, self.unwritten_since = self.pending, None, None
        try:
            rendered = self.renderer.render_model(model)
        except RenderError as exc:
            log.error("the config for runtime changes could not be rendered", error=str(exc))
            self.live = replace(self.live, model=model, known=False)
            return
        # No fsync: HAProxy already runs this state, and a crash that loses the file loses
        # HAProxy's memory too; the fsync cost ~10 ms of blocked loop per write here.
        write_atomic(self.files.routes_map, rendered.routes, sync=False)
        write_atomic(self.files.config, rendered.text, sync=False)
        self.live = rendered
        if self.unchecked_since is None:
            self.unchecked_since = time.monotonic()

    async def check_live(self) -> None:
        """`haproxy -c` on a live file written after runtime changes (called when the
        catalog is quiet). A refusal is reported; the next apply then reloads the
        canonical config through the full check instead of trusting the layout."""
        self.write_live()
        live = self.live
        if self.unchecked_since is None or live is None:
            return
        error = await check_config(self.binary, self.files.config, self.haproxy.pass_fds)
        self.checked_at = time.monotonic()
        if self.live is not live:
            return  # an apply ran meanwhile: it has its own file to check
        self.unchecked_since = None
        if error is None:
            write_atomic(self.files.last_good, live.text)
            self._installed = live
            return
        self._keep_rejected(live.text, error)
        log.error("the config written after runtime changes is refused", error=error[:2000])
        self.live = replace(live, known=False)
        if self.on_late_rejection is not None:
            self.on_late_rejection(error)

    async def flush(self) -> None:
        """At shutdown: the files for what HAProxy runs, so the next start serves it."""
        self.write_live()

    async def _validate_or_restore(self, text: str) -> None:
        """Validate after runtime changes; if invalid, reload the live file (which still
        holds the previous config) to undo them."""
        try:
            await self.validate(text)
        except Rejected:
            log.error("config refused after runtime changes, reloading the live config")
            with contextlib.suppress(HaproxyError):
                await self.haproxy.reload()
            self._files_run()
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
        write_atomic(self.files.server_state, filter_server_state(dump, model))

    async def _reload(self, rendered: Rendered) -> None:
        assert self._installed is not None
        previous = self.live if self.live is not None else self._installed
        await self._save_server_state(rendered.model)
        # The map's values are only backend names and its keys safe tokens: it cannot make
        # a config invalid, so the one validated beside the old map is valid with the new.
        write_atomic(self.files.routes_map, rendered.routes)
        os.replace(self.files.candidate, self.files.config)
        try:
            await self.haproxy.reload()
        except HaproxyError as exc:
            log.error("reload failed, restoring the last good config", error=str(exc))
            write_atomic(self.files.routes_map, previous.routes)
            write_atomic(self.files.config, previous.text)
            self.live = previous
            try:
                await self.haproxy.reload()
            except HaproxyError as again:
                log.error("reload of the last good config failed too", error=str(again))
            raise ApplyFailed(str(exc)) from exc
        finally:
            self._files_run()
        write_atomic(self.files.last_good, rendered.text)
        self.live = self._installed = rendered
        self.unchecked_since = None

    def _files_run(self) -> None:
        """HAProxy (re)started from the files: runtime changes not in them are gone."""
        self.runtime.forget()
        self.pending = self.unwritten_since = None

    def restarted(self) -> None:
        """HAProxy was restarted from the live file: nothing is pending any more, and
        what runs is unknown: the file as it was when HAProxy read it, which may be
        before or after the files for the last runtime changes were written (a chaos
        soak caught a restart reading the file 60 ms before they landed). The next apply
        reloads, so HAProxy reads the file as it is now, every change in it (and not
        the last placement either, which a runtime apply would take as what runs)."""
        self._files_run()
        self._placed = None
        if self.live is not None:
            text = self.files.config.read_text()
            routes = self.files.routes_map.read_text() if self.files.routes_map.is_file() else ""
            self.live = Rendered(text, self.live.model, routes, known=False)
