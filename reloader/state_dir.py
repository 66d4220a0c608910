"""The reloader's state directory, every file in it named once.

The renderer prints some of these paths into haproxy.cfg (sockets, server state, the
routes map), the applier writes the config and its candidates, the HAProxy supervisor
keeps its pid there, and the bench and tests read the live config: one list, so that
renaming a file cannot leave one of them looking in the wrong place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class StateDir:
    root: Path

    @property
    def config(self) -> Path:
        """The config HAProxy runs (and the next start serves)."""
        return self.root / "haproxy.cfg"

    @property
    def candidate(self) -> Path:
        """A config being checked with `haproxy -c` before it replaces `config`."""
        return self.root / "haproxy.cfg.candidate"

    @property
    def rejected(self) -> Path:
        """The last config `haproxy -c` refused, kept for the operator."""
        return self.root / "haproxy.cfg.rejected"

    @property
    def rejected_reason(self) -> Path:
        """HAProxy's words about `rejected`."""
        return self.root / "haproxy.cfg.rejected.txt"

    @property
    def last_good(self) -> Path:
        """The config to go back to when HAProxy does not take a valid one."""
        return self.root / "haproxy.cfg.last-good"

    @property
    def server_state(self) -> Path:
        """Server states dumped before a reload, loaded by the new workers."""
        return self.root / "server-state"

    @property
    def routes_map(self) -> Path:
        """The HTTP frontend's routing table: `host/path-prefix/ backend` per line."""
        return self.root / "routes.map"

    @property
    def admin_socket(self) -> Path:
        return self.root / "admin.sock"

    @property
    def master_socket(self) -> Path:
        return self.root / "master.sock"

    @property
    def pid_file(self) -> Path:
        """HAProxy's master pid, so a restarted reloader can take over an orphan."""
        return self.root / "haproxy.pid"

    @property
    def acme_account(self) -> Path:
        """The ACME account key of this edge (reloader/acme.py)."""
        return self.root / "acme-account.pem"

    # HTTPS: beside the config, not in it (reloader/certs.py keeps these files and
    # HAProxy's memory in step through the runtime API, so they never cost a reload).
    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def tls_certs(self) -> Path:
        """One PEM (chain + key) per certificate record."""
        return self.tls_dir / "certs"

    @property
    def default_cert(self) -> Path:
        return self.tls_dir / "default.pem"

    @property
    def crt_list(self) -> Path:
        return self.tls_dir / "crt-list"

    @property
    def https_map(self) -> Path:
        return self.tls_dir / "https.map"

    @property
    def hsts_map(self) -> Path:
        return self.tls_dir / "hsts.map"
