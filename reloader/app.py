"""The reloader process: catalog -> debounce -> guard -> render -> apply, and around it
HAProxy supervision, the status key in etcd and the status HTTP server.

Tasks (each named; one that ends takes the process down, see fluster.runtime):
catalog (list + watch), pipeline (apply loop), haproxy (restart on death), publisher
(status key + lease), plus the aiohttp server. Shutdown order: stop applying, stop
HAProxy gracefully (it finishes in-flight requests), revoke the lease, close etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import structlog

from fluster.catalog import Catalog, Snapshot
from fluster.runtime import Supervisor, TaskDied
from fluster.store import open_store
from reloader.acme import AcmeIssuer
from reloader.apply import Applier, ApplyFailed, Rejected
from reloader.build import ServiceCache, build_model
from reloader.certs import CertWatcher, TlsFiles
from reloader.counters import Counters
from reloader.debounce import Debouncer
from reloader.facts import FactFinder, Reporter, tcp_ports_in
from reloader.guard import LiveServers, RemovalGuard
from reloader.haproxy import Haproxy, StartFailed
from reloader.model import Model, with_servers_of
from reloader.publish import Publisher
from reloader.render import Renderer, RenderError
from reloader.server import StatusServer
from reloader.settings import Settings
from reloader.state_dir import StateDir
from reloader.status import (
    ApplyRecord,
    FailureReason,
    Stats,
    describe_change,
    status_of,
)
from reloader.tls import EdgeTls
from reloader.upkeep import Upkeep, due

log = structlog.get_logger("reloader")

FIRST_SNAPSHOT_WAIT = 5.0


class Reloader:
    def __init__(self, settings: Settings, renderer: Renderer) -> None:
        self.settings = settings
        self.renderer = renderer
        rs = settings.render
        self.store = open_store(settings.etcd)
        self.catalog = Catalog(self.store, settings.prefix)
        self.debouncer = Debouncer(settings.quiet, settings.max_wait)
        self.guard = RemovalGuard(settings.max_removal_pct, settings.removal_hold, settings.guard)
        self.haproxy = Haproxy(
            settings.haproxy,
            rs.files.config,
            rs.files.master_socket,
            rs.files.pid_file,
            on_restart=self._haproxy_restarted,
            before_restart=self._haproxy_restarting,
            pass_fds=() if rs.http_fd is None else (rs.http_fd,),
        )
        self.applier = Applier(self.haproxy, settings.haproxy, rs.files, renderer)
        self.stats = Stats()
        self.applier.on_late_rejection = self.stats.late_rejection
        self.upkeep = Upkeep(self.applier, rs.pool_size)
        self.publisher = Publisher(self.store, settings.prefix, settings.reloader_id, settings.node)
        self.counters = Counters(
            settings.prefix,
            settings.reloader_id,
            self.publisher.lease,
            self.applier.admin,
            lambda: {n: s.spec for n, s in (self.latest.services if self.latest else {}).items()},
        )
        self.certs = CertWatcher(self.store, settings.prefix)
        self.certs.on_change = self._certs_changed
        self.tls = EdgeTls(
            TlsFiles(rs, rs.admin_socket), self.certs, rs.domain, self.haproxy, self.stats
        )
        self.acme = (
            AcmeIssuer(
                settings.acme,
                self.store,
                settings.prefix,
                rs.state_dir,
                settings.reloader_id,
                lambda: self.applied,
                self.certs.valid,
            )
            if settings.acme
            else None
        )
        self.latest: Snapshot | None = None
        self.applied: Snapshot | None = None
        self.facts = FactFinder(rs)
        self.reporter = Reporter()
        self.changed_at = time.monotonic()  # the last snapshot from the catalog
        self.pieces = ServiceCache()  # per-service model pieces, reused while unchanged

    # -- catalog -> pipeline -------------------------------------------------------------

    def _certs_changed(self) -> None:
        self.debouncer.poke()
        if self.acme is not None:
            self.acme.wake.set()  # a certificate came or went: orders may be due

    def on_snapshot(self, snapshot: Snapshot) -> None:
        self.latest = snapshot
        self.changed_at = time.monotonic()
        self.stats.saw(snapshot.revision)
        self.debouncer.poke()

    async def pipeline(self) -> None:
        while True:
            timeout = self._next_wakeup()
            settled = await self.debouncer.settled(timeout)
            if self.latest is None:
                continue
            recheck = self.reporter.due()
            if settled or recheck or self.guard.held or self.applier.runtime.pending_deletes:
                await self.apply(self.latest)
            # The housekeeping below runs on its own clocks, whatever else woke the loop:
            # a removed server that keeps connections (retried every second) or a held
            # removal must not keep the files from following the runtime changes.
            # (reloader/upkeep.py says when each is due.)
            if due(self.upkeep.refill_at(self.changed_at)):
                await self.apply(self.latest, tidy=True)
            elif due(self.upkeep.write_at(self.changed_at)):
                self.applier.write_live()
            elif due(self.upkeep.check_at(self.changed_at)):
                await self.applier.check_live()

    def _next_wakeup(self) -> float | None:
        if self.applier.runtime.pending_deletes:
            return 1.0
        times = [self.guard.next_release(), self.reporter.recheck_at]
        times += self.upkeep.times(self.changed_at)
        due = [t for t in times if t is not None]
        return None if not due else max(0.0, min(due) - time.monotonic()) + 0.01

    async def _model(self, snapshot: Snapshot, *, tls: bool) -> Model:
        """The model against the host's facts (reloader.facts): what resolves, which ports
        are free, which addresses are this edge's own."""
        live, running = self.applier.live, self.applier.known
        if running is not None:
            facts = await self.facts.find(snapshot, running)
        else:
            # A previous run's config (adopted, or still served by the HAProxy this run
            # takes over): the TCP ports it binds are this edge's, not another process's.
            file = StateDir(self.settings.render.state_dir).config
            text = live.text if live is not None else file.read_text() if file.is_file() else ""
            facts = await self.facts.find(snapshot, None, tcp_ports_in(text))
        return build_model(snapshot, self.settings.render, facts, tls=tls, cache=self.pieces)

    async def _apply_servers_only(self, model: Model, revision: int) -> None:
        """After a refused structural change, apply what still can be: server changes of
        the backends that exist now. The change as a whole stays unapplied (and
        unpublished); the next change retries it."""
        running = self.applier.known
        if running is None:
            return  # live came from a previous run's file: its model is unknown
        try:
            partial = with_servers_of(running, model)
            if partial == running:
                return
            kind = await self.applier.apply(partial)
        except (Rejected, RenderError, ApplyFailed) as exc:
            log.error("server changes could not be applied either", error=str(exc)[:2000])
            return
        self.stats.applies[kind] += 1
        log.warning(
            "applied server changes only; the structural change waits", kind=kind, revision=revision
        )

    def _haproxy_restarting(self) -> None:
        # The files may lag the runtime changes HAProxy ran by up to WRITE_MAX: write
        # them before the new master reads them, or it serves without those changes
        # (a new service answered 404) until the reload that follows the restart.
        self.applier.write_live()

    def _haproxy_restarted(self) -> None:
        # HAProxy came back from the live file, which may lag the runtime API by one
        # apply: reconcile now rather than at the next change.
        self.applier.restarted()
        self.tls.restarted()
        self.debouncer.poke()

    def _live_servers(self) -> LiveServers | None:
        """Service -> the servers HAProxy has now, for the removal guard; None when
        the live config is a previous run's file, whose model is unknown."""
        running = self.applier.known
        if running is None:
            return None
        return LiveServers(running.backends, self.applier.service_index())

    async def apply(self, snapshot: Snapshot, tidy: bool = False) -> None:
        started = time.monotonic()
        at = datetime.now(UTC).isoformat(timespec="milliseconds")
        model: Model | None = None
        try:
            guarded = self.guard.filter(snapshot, self.applied, self._live_servers())
            tls = self.tls.write(guarded)
            model = await self._model(guarded, tls=bool(tls.certs))
            kind = await self.applier.apply(model, tidy)
            await self.tls.push(tls, https=model.https_bind is not None, kind=kind)
        except (Rejected, RenderError, ApplyFailed) as exc:
            reason: FailureReason = (
                "rejected"
                if isinstance(exc, Rejected)
                else "render"
                if isinstance(exc, RenderError)
                else "reload"
            )
            change = describe_change(self.applied, snapshot)
            self.stats.failed(ApplyRecord(snapshot.revision, at, "failed", change), reason, exc)
            log.error(
                "change not applied, live config keeps serving",
                reason=reason,
                error=str(exc)[:2000],
                revision=snapshot.revision,
            )
            if model is not None:
                await self._apply_servers_only(model, snapshot.revision)
            return
        elapsed = time.monotonic() - started
        before, self.applied = self.applied, guarded
        self.stats.applies[kind] += 1
        if kind != "noop":
            change = describe_change(before, guarded)
            self.stats.changed(ApplyRecord(snapshot.revision, at, kind, change), elapsed, model)
            log.info(
                "applied",
                kind=kind,
                reason=self.applier.last_reason if kind == "reload" else None,
                pool_free=self.applier.pool_free,
                revision=snapshot.revision,
                seconds=round(elapsed, 4),
                servers=model.server_count,
            )
        self.reporter.report(model, guarded, self.facts.resolver)
        self.publisher.publish(snapshot.revision)
        if self.acme is not None:
            self.acme.wake.set()  # services (and so hosts) may have changed

    # -- status --------------------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        if not self.haproxy.up:
            return False, "haproxy is down"
        age = self.catalog.sync_age()
        if age is None or age > self.settings.sync_max_age:
            return False, f"etcd state is stale (last sync {age} s ago)"
        return True, "ok"

    # -- lifecycle -----------------------------------------------------------------------

    async def _first_snapshot(self) -> Snapshot | None:
        deadline = time.monotonic() + FIRST_SNAPSHOT_WAIT
        while (self.latest is None or not self.certs.loaded) and time.monotonic() < deadline:
            await self.debouncer.settled(0.05)
        return self.latest

    async def _install_first_config(self) -> Snapshot | None:
        """The config HAProxy starts with: etcd's state, or without etcd, the config we
        served last time (an edge restarting during an etcd outage keeps its routes)."""
        first = await self._first_snapshot()
        self.debouncer.due()  # the first snapshot is applied right here
        if first is None:
            log.warning("no etcd state yet", wait_s=FIRST_SNAPSHOT_WAIT)
        self.tls.files.ensure_default()
        tls = self.tls.write(first or Snapshot())
        self.tls.live = tls
        model = await self._model(first or Snapshot(), tls=bool(tls.certs))
        rendered = self.renderer.render_model(model)
        if first is None and await self.applier.initial_from_file(rendered):
            log.warning("starting HAProxy with the config of the previous run")
        else:
            await self.applier.initial(rendered)
            self.reporter.report(rendered.model, first or Snapshot(), self.facts.resolver)
        return first

    async def run(self, stop: asyncio.Event) -> int:
        self.settings.render.state_dir.mkdir(parents=True, exist_ok=True)
        supervisor = Supervisor()
        status = StatusServer(  # /status, /metrics, the dashboard: reloader/status.py
            lambda: status_of(self), self.healthy, self.acme.answer if self.acme else None
        )
        # Stopped first: what takes changes in, and HAProxy's watcher (HAProxy's graceful
        # stop below is not a death to restart from, nor to log as one).
        intake: list[asyncio.Task[Any]] = []
        try:
            await self.store.connect()
            intake.append(supervisor.start("catalog", self.catalog.run(self.on_snapshot)))
            intake.append(supervisor.start("certs", self.certs.run()))
            try:
                first = await self._install_first_config()
            except (Rejected, RenderError) as exc:
                log.error("the first config is invalid, cannot start HAProxy", error=str(exc))
                return 1
            self.applied = first
            try:
                await self.haproxy.start()
            except StartFailed as exc:
                log.error("cannot start HAProxy", error=str(exc))
                return 1
            if first is not None and first.revision:
                self.publisher.publish(first.revision)
            intake.append(supervisor.start("haproxy", self.haproxy.supervise()))
            intake.append(supervisor.start("pipeline", self.pipeline()))
            supervisor.start("publisher", self.publisher.run())
            supervisor.start("counters", self.counters.run())
            try:
                await status.start(*self.settings.status_bind)
            except OSError as exc:
                log.error(
                    "cannot serve the status address",
                    error=str(exc),
                    status_bind=self.settings.status_bind,
                )
                return 1
            if self.acme is not None:  # after the status server: it answers the challenges
                supervisor.start("acme", self.acme.run())
            log.info(
                "reloader running",
                status_bind=self.settings.status_bind,
                revision=first.revision if first else None,
            )
            try:
                await supervisor.wait(stop)
            except TaskDied:
                return 1
            return 0
        finally:
            await self._shutdown(supervisor, intake, status)

    async def _shutdown(
        self, supervisor: Supervisor, intake: list[asyncio.Task[Any]], status: StatusServer
    ) -> None:
        await supervisor.cancel(*intake)
        # The last runtime apply's file, so that the next start serves the same.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.applier.flush(), 10)
        await self.applier.runtime.close()
        await self.haproxy.stop()
        await supervisor.cancel_all()
        with contextlib.suppress(Exception):
            await status.close()
        await self.publisher.close()
        await self.store.close()
        log.info("reloader stopped")
