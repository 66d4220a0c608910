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
from pathlib import Path
from typing import TYPE_CHECKING

from fluster.catalog import Snapshot
from reloader.model import RenderSettings, backend_name
from reloader.render import Renderer

if TYPE_CHECKING:
    from bench.pipelines import Counts, Pipeline

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
        lines = (state_dir / "routes.map").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, backend = line.partition(" ")
        if backend.startswith("pool_"):
            out[backend] = key.split(".", 1)[0]
    return out


def reloader_command(p: Pipeline) -> list[str]:
    return [
        str(Path(sys.executable).with_name("reloader")),
        "run",
        "--state-dir", str(p.state_dir),
        "--http-bind", f"127.0.0.1:{p.http_port}",
        "--status-bind", f"127.0.0.1:{p.status_port}",
        "--etcd-endpoints", p.etcd_endpoints,
        "--prefix", p.prefix,
        "--http-pool", str(POOL),
        "--log-level", "warning",
    ]  # fmt: skip


def reloader_counts(p: Pipeline) -> Counts:
    from bench.pipelines import Counts

    url = f"http://127.0.0.1:{p.status_port}/metrics"
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
