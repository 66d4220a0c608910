"""Everything the bench knows about the reloader's API, in one place.

The reloader (issue 4) is being written alongside the bench. Until its render function
can be imported, `render` falls back to a stand-in template below so the harness and the
baseline can run; every result produced that way says so (`RENDERER`).
"""

from __future__ import annotations

from pathlib import Path

from fluster.catalog import Snapshot

RENDERER = "stand-in"


def _standin(snapshot: Snapshot, *, state_dir: Path, http_bind: str) -> str:
    lines = [
        "global",
        "    maxconn 4096",
        f"    stats socket {state_dir}/haproxy.sock mode 600 level admin",
        "    hard-stop-after 30s",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    option idle-close-on-response",
        "frontend http",
        f"    bind {http_bind}",
    ]
    for name in snapshot.services:
        lines.append(f"    use_backend be_{name} if {{ hdr(host) -i {name}.localhost }}")
    for name, svc in snapshot.services.items():
        lines += [f"backend be_{name}", f"    balance {svc.spec.balance}"]
        for inst_name, inst in svc.routed().items():
            lines.append(f"    server {inst_name} {inst.host}:{inst.port} weight {inst.weight}")
    return "\n".join(lines) + "\n"


def render(snapshot: Snapshot, *, state_dir: Path, http_bind: str) -> str:
    return _standin(snapshot, state_dir=state_dir, http_bind=http_bind)


def stats_socket(config_text: str) -> Path | None:
    """The admin stats socket a rendered config declares."""
    for line in config_text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[:2] == ["stats", "socket"]:
            return Path(words[2])
    return None


def service_of_backend(backend: str) -> str:
    return backend.removeprefix("be_")


def reloader_command(pipeline: object) -> list[str]:
    raise NotImplementedError("the reloader has not landed yet")


def reloader_counts(pipeline: object) -> object:
    raise NotImplementedError("the reloader has not landed yet")
