"""What HAProxy is actually doing, asked over its admin stats socket.

"HAProxy's state equals etcd's" (P4) is judged here, not from the reloader's own account:
the set of servers that are up, not in maintenance and not drained, per backend.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Server:
    backend: str
    name: str
    addr: str
    port: int
    op_state: int
    admin_state: int
    weight: int

    @property
    def serving(self) -> bool:
        # op_state 2 = running; any admin bit means maintenance or drain; weight 0 = drained.
        return self.op_state == 2 and self.admin_state == 0 and self.weight > 0


async def command(socket_path: Path, line: str, *, within: float = 5.0) -> str:
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            return (await reader.read()).decode(errors="replace")
        finally:
            writer.close()


async def servers(socket_path: Path) -> list[Server]:
    text = await command(socket_path, "show servers state")
    fields: list[str] = []
    out: list[Server] = []
    for line in text.splitlines():
        if line.startswith("# "):
            fields = line[2:].split()
            continue
        words = line.split()
        if not fields or len(words) < len(fields):
            continue
        row = dict(zip(fields, words, strict=False))
        out.append(
            Server(
                backend=row["be_name"],
                name=row["srv_name"],
                addr=row["srv_addr"],
                port=int(row.get("srv_port", "0")),
                op_state=int(row["srv_op_state"]),
                admin_state=int(row["srv_admin_state"]),
                weight=int(row["srv_uweight"]),
            )
        )
    return out


def serving(
    all_servers: list[Server], service: str, pooled: dict[str, str] | None = None
) -> Counter[str]:
    """addr:port of every serving server in the backends of `service` (with multiplicity).
    `pooled`: backend -> service for the reloader's pool backends (pool_N)."""
    pooled = pooled or {}

    def of(backend: str) -> str:
        return pooled.get(backend) or backend_of(backend)

    return Counter(
        f"{s.addr}:{s.port}" for s in all_servers if s.serving and of(s.backend) == service
    )


def backend_of(backend: str) -> str:
    """The service a backend serves; the stand-in and reloader name them differently."""
    from bench import adapter

    return adapter.service_of_backend(backend)
