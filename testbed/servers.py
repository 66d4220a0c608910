"""What HAProxy routes to, asked of HAProxy itself (admin socket, `show servers state`),
and what etcd says is up: the two sides of every "HAProxy's servers equal etcd's" check
in the tests, the bench and the chaos soak."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from fluster.records import Instance, RecordError
from testbed.reloader import unix_command

# srv_admin_state bits that take a server out of rotation (HAProxy's SRV_ADMF_*):
# forced/inherited/config maintenance, resolution maintenance, forced/inherited drain.
OUT_OF_ROTATION = 0x01 | 0x02 | 0x04 | 0x20 | 0x08 | 0x10

Address = tuple[str, int]


def haproxy_servers(sock: Path) -> dict[str, set[Address]]:
    """backend -> {(addr, port)} of the servers in rotation, as HAProxy says right now."""
    out: dict[str, set[Address]] = {}
    for line in unix_command(sock, "show servers state").splitlines():
        fields = line.split()
        if not fields or line.startswith("#") or len(fields) < 19 or not fields[0].isdigit():
            continue
        backend, addr, admin, port = fields[1], fields[4], int(fields[6]), fields[18]
        out.setdefault(backend, set())
        if not admin & OUT_OF_ROTATION:
            out[backend].add((addr, int(port)))
    return out


def service_servers(state_dir: Path, service: str, domain: str = "localhost") -> set[Address]:
    """The servers in rotation for an HTTP service, wherever HAProxy keeps them: its own
    `be_SERVICE` backend, or the pool backend the routes map points its host at (a
    service that arrived after the last reload lives in a pool backend)."""
    sock = state_dir / "admin.sock"
    backend = f"be_{service}"
    for line in unix_command(sock, f"show map {state_dir / 'routes.map'}").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == f"{service}.{domain}/":
            backend = parts[2]
    return haproxy_servers(sock).get(backend, set())


def registered_up(
    endpoints: Iterable[str], service: str, prefix: str = "/fluster", timeout: float = 1.0
) -> set[Address] | None:
    """The addresses of `service`'s `up` records, read through etcd's JSON gateway from
    the first member that answers (no etcdctl process per poll); None if none does."""
    key = f"{prefix}/services/{service}/instances/".encode()
    end = key[:-1] + bytes([key[-1] + 1])
    body = json.dumps(
        {"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode()}
    ).encode()
    for endpoint in endpoints:
        request = urllib.request.Request(f"http://{endpoint}/v3/kv/range", data=body)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                kvs = json.loads(reply.read()).get("kvs", [])
        except (OSError, urllib.error.URLError, ValueError):
            continue
        out = set()
        for kv in kvs:
            try:
                inst = Instance.parse(base64.b64decode(kv["value"]).decode())
            except (RecordError, ValueError):
                continue
            if inst.state == "up":
                out.add((inst.host, inst.port))
        return out
    return None
