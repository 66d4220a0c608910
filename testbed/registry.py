"""Debian's docker-registry (the distribution registry 2.8) on loopback, for deploy tests
and the bench.

The Docker engine treats registries on 127.0.0.0/8 as insecure by default, so it pushes
and pulls over plain HTTP without any daemon configuration. Storage is a directory of
the test's; the registry is stopped and the directory removed afterwards. Its port is
written into its config, so it comes from `free_port()`: when the log says another
process took it first, the registry starts again on a fresh one (testbed/ports.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

from testbed.ports import free_port, lost_a_port, start_on_fresh_ports
from testbed.process import LogFile, wait_or_kill
from testbed.waiting import GaveUp, wait_for

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = LogFile(root / "registry.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        return start_on_fresh_ports(
            self._start,
            lambda: lost_a_port(self._log.since_start()),
            self._on_fresh_port,
            f"docker-registry (log: {self.root}/registry.log)",
        )

    def _start(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(CONFIG.format(root=self.root, port=self.port))
        self.proc = self._log.spawn([REGISTRY, "serve", str(config)])
        wait_for(self._up, timeout=20, interval=0.1, what=f"docker-registry on {self.address}")
        return self

    def _on_fresh_port(self) -> None:
        self.stop()
        self.port = free_port()

    def _up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise GaveUp(
                f"docker-registry exited {self.proc.returncode}:\n{self._log.since_start()}"
            )
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def log(self) -> str:
        return self._log.text()

    def tags(self, repository: str) -> list[str]:
        url = f"http://{self.address}/v2/{repository}/tags/list"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return list(json.loads(resp.read()).get("tags") or [])
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            wait_or_kill(self.proc, 10)
