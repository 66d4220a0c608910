"""Everything the bench knows about the reloader's interfaces, in one place.

- its render function (`reloader.render.Renderer`), which the baseline reuses so the
  comparison is about applying a config, not about templating it (the baseline only
  overrides routing.j2 with the classic chain of one ACL per service, and has no
  backend pool: bench/baseline_templates/);
- its command line (`reloader run ...`, the console script);
- its counters, read from `/metrics` (`reloader_applies_total{kind=...}`): /status would
  do too, but it lists every instance, too heavy to poll every few milliseconds;
- the admin stats socket and backend names of the configs it renders.
"""

from __future__ import annotations

import functools
import re
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fluster.catalog import Snapshot
from reloader.model import RenderSettings, backend_name
from reloader.render import Renderer
from reloader.state_dir import StateDir

_APPLIES = re.compile(r'^reloader_applies_total\{kind="(\w+)"\} (\S+)$', re.M)
_DURATION = re.compile(r"^reloader_apply_duration_seconds_(sum|count) (\S+)$", re.M)


BASELINE_TEMPLATES = Path(__file__).with_name("baseline_templates")
POOL = 100  # the reloader's --http-pool in the bench: P2's first 100 trials use it


@functools.cache
def _renderer() -> Renderer:
    return Renderer(BASELINE_TEMPLATES)


def render(snapshot: Snapshot, *, state_dir: Path, http_bind: str) -> str:
    host, _, port = http_bind.rpartition(":")
    settings = RenderSettings(state_dir=state_dir, http_bind=(host, int(port)), pool_size=0)
    return _renderer().render(snapshot, settings).text


def stats_socket(config_text: str) -> Path | None:
    """The admin stats socket a rendered config declares."""
    for line in config_text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[:2] == ["stats", "socket"]:
            return Path(words[2])
    return None


__all__ = ["backend_name"]


def service_of_backend(backend: str) -> str:
    prefix = backend_name("")  # "be_"
    return backend.removeprefix(prefix)


def pooled_backends(state_dir: Path) -> dict[str, str]:
    """pool_N -> service, from the reloader's routes map (`SERVICE.localhost/ pool_N`)."""
    try:
        lines = StateDir(state_dir).routes_map.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, backend = line.partition(" ")
        if backend.startswith("pool_"):
            out[backend] = key.split(".", 1)[0]
    return out


def reloader_command(
    *, state_dir: Path, http_port: int, status_port: int, etcd_endpoints: str, prefix: str
) -> list[str]:
    return [
        str(Path(sys.executable).with_name("reloader")),
        "run",
        "--state-dir", str(state_dir),
        "--http-bind", f"127.0.0.1:{http_port}",
        "--status-bind", f"127.0.0.1:{status_port}",
        "--etcd-endpoints", etcd_endpoints,
        "--prefix", prefix,
        "--http-pool", str(POOL),
        "--log-level", "warning",
    ]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Counts:
    applies: int = 0  # config changes applied in any way
    reloads: int = 0  # of which: HAProxy reloads/restarts (new processes)
    runtime: int = 0  # of which: through the runtime API only
    apply_seconds: float = 0.0  # total time spent applying (render -> HAProxy has it)
    timed: int = 0  # applies that apply_seconds covers

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.applies - other.applies,
            self.reloads - other.reloads,
            self.runtime - other.runtime,
            self.apply_seconds - other.apply_seconds,
            self.timed - other.timed,
        )

    @property
    def mean_apply(self) -> float | None:
        return self.apply_seconds / self.timed if self.timed else None


def reloader_counts(status_port: int) -> Counts:
    url = f"http://127.0.0.1:{status_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:  # loopback only
            text = reply.read().decode()
    except OSError:
        return Counts()
    kinds = {kind: int(float(value)) for kind, value in _APPLIES.findall(text)}
    runtime, reload = kinds.get("runtime", 0), kinds.get("reload", 0)
    timing = dict(_DURATION.findall(text))
    return Counts(
        applies=runtime + reload,
        reloads=reload,
        runtime=runtime,
        apply_seconds=float(timing.get("sum", 0)),
        timed=int(float(timing.get("count", 0))),
    )
