"""The edge's HTTPS state from one apply to the next (reloader/certs.py has the pieces).

For each snapshot the files come first (`write`: certificates, crt-list, policy maps),
before HAProxy is asked to do anything, so that a reload or a restart at any moment
reproduces them; then HAProxy's memory follows (`push`): nothing after a reload (it read
the files), the difference through the runtime API otherwise, and a reload of the
(valid, current) files when the runtime API refuses any of it.
"""

from __future__ import annotations

import time

import structlog

from fluster.catalog import Snapshot
from fluster.certs import Certificate
from reloader.certs import CertWatcher, TlsFiles, TlsTarget, target
from reloader.haproxy import Haproxy, HaproxyError
from reloader.status import Stats

log = structlog.get_logger("reloader")


class EdgeTls:
    def __init__(
        self, files: TlsFiles, certs: CertWatcher, domain: str, haproxy: Haproxy, stats: Stats
    ) -> None:
        self.files, self.certs, self.domain = files, certs, domain
        self.haproxy, self.stats = haproxy, stats
        self.live = TlsTarget()  # what HAProxy holds in memory
        self.applies = 0  # changes made through the runtime API
        self.failures = 0  # changes it refused (a reload applied them instead)
        # The last target and what it was made of, reused while specs and certs stay.
        self._target: tuple[Snapshot, dict[str, Certificate], TlsTarget] | None = None

    def write(self, snapshot: Snapshot) -> TlsTarget:
        """The HTTPS files for `snapshot` and the valid certificates, on disk."""
        certs = self.certs.valid()
        kept = self._target
        if kept is not None and kept[1] == certs and snapshot.same_layout(kept[0]):
            want = kept[2]  # the same specs and certificates: the same target
        else:
            want = target(certs, snapshot, self.domain)
            self._target = (snapshot, certs, want)
        self.files.write(want)
        return want

    def restarted(self) -> None:
        """HAProxy started again: it holds what the files hold."""
        self.live = self.files.written

    async def push(self, want: TlsTarget, *, https: bool, kind: str) -> None:
        """HAProxy's memory to `want` after an apply of `kind` (see the module doc)."""
        if kind == "reload" or not https or want == self.live:
            self.live = want
            return
        try:
            started = time.monotonic()
            changes = await self.files.push(self.live, want)
        except HaproxyError as exc:
            log.error("certificate change refused by the runtime API, reloading", error=str(exc))
            self.failures += 1
            self.stats.last_error = f"tls: {exc}"[:2000]
            try:
                await self.haproxy.reload()
            except HaproxyError as again:
                # The files stay right; the next change (or a restart) tries again.
                log.error("reload for the certificate change failed too", error=str(again))
                return
            self.stats.applies["reload"] += 1
        else:
            self.applies += 1
            log.info(
                "applied certificates and HTTPS policy",
                changes=changes,
                seconds=round(time.monotonic() - started, 4),
            )
        self.live = want
