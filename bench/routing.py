"""P7 (routing cost: the 1st vs the 500th of 500 services) and P10 (CPU per membership
change with 1 and with 500 services), for both pipelines.

P7 sends its requests to a second HAProxy that answers every request itself
(`http-request return`), so the backend is never the bottleneck and what differs between
the 1st and the 500th service is the routing in front of it. wrk runs alternately on the
two hosts, `rounds` times each, and the row reports the medians.

P10 starts each pipeline on a catalog that already holds N services of two instances,
then adds and removes one instance of one service `changes` times, each waiting until
HAProxy has it, and reads the CPU time of the pipeline process and of the children it
waited for (`haproxy -c`; HAProxy itself is not counted) before and after, including a
quiet period at the end so that deferred work (the reloader's file check) is counted.
"""

from __future__ import annotations

import asyncio
import re
import resource
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import haproxy
from bench.scenarios import Env, instance, make_pipeline, put_many, start
from fluster import keys
from testbed.ports import PORT_ATTEMPTS, free_port, lost_a_port
from testbed.process import cpu_with_children, wait_or_kill

_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)


@dataclass
class Lookup:
    first: list[float] = field(default_factory=list)  # req/s to the 1st service, per round
    last: list[float] = field(default_factory=list)  # req/s to the last service
    services: int = 0
    command: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.first or not self.last:
            return None
        return statistics.median(self.last) / statistics.median(self.first)


def responder(work: Path, within: float = 10.0) -> tuple[subprocess.Popen[bytes], int]:
    """A HAProxy answering 200 "ok" to everything on a free loopback port. The port comes
    from `free_port()`; if another process took it before HAProxy bound it, HAProxy is
    started again on a fresh one, at most PORT_ATTEMPTS times."""
    cfg, log_path = work / "p7-responder.cfg", work / "p7-responder.log"
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        cfg.write_text(
            "global\n    maxconn 2000\n"
            "defaults\n    mode http\n    timeout client 30s\n    timeout connect 5s\n"
            "    timeout server 30s\n"
            f"frontend answer\n    bind 127.0.0.1:{port}\n"
            "    http-request return status 200 content-type text/plain string ok\n"
        )
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=log
            )
        deadline = time.monotonic() + within
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers_ok(port):
                return proc, port
            time.sleep(0.05)
        wait_or_kill(proc, 5)
        output = log_path.read_text(errors="replace")
        if not lost_a_port(output):
            raise RuntimeError(
                f"the P7 responder did not answer on {port} within {within}s: {output[-2000:]}"
            )
    raise RuntimeError(
        f"the P7 responder lost its port to another process {PORT_ATTEMPTS} "
        f"times in a row: {output[-2000:]}"
    )


def _answers_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return sock.recv(4096).split(b"\r\n", 1)[0].endswith(b" 200 OK")
    except OSError:
        return False


def wrk(port: int, host: str, seconds: float) -> tuple[float, str]:
    argv = ["wrk", "-t1", "-c16", f"-d{seconds:g}s", "-H", f"Host: {host}"]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = _RPS.search(out)
    return (float(m.group(1)) if m else 0.0), " ".join(argv)


async def _status_of(port: int, host: str) -> int:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 5)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except (OSError, TimeoutError, ValueError, IndexError):
        return 0
    finally:
        writer.close()


async def _until_served(port: int, hosts: list[str], within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        codes = [await _status_of(port, h) for h in hosts]
        if all(c == 200 for c in codes):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{hosts} not all served within {within}s")


async def p7_lookup(
    env: Env, kind: str, services: int = 500, seconds: float = 3.0, rounds: int = 3
) -> Lookup:
    proc, port = responder(env.work)
    pipeline = make_pipeline(kind, env, f"/bench-p7-{kind}")
    names = [f"s{i:03d}" for i in range(services)]
    result = Lookup(services=services)
    try:
        items = [(keys.instance_key(pipeline.prefix, n, "i0"), instance(port)) for n in names]
        await put_many(env.store, items)
        await start(pipeline)
        first, last = f"{names[0]}.localhost", f"{names[-1]}.localhost"
        await _until_served(pipeline.http_port, [first, last], within=60)
        await asyncio.sleep(1.0)
        for _ in range(rounds):
            for host, out in ((first, result.first), (last, result.last)):
                rps, result.command = await asyncio.to_thread(
                    wrk, pipeline.http_port, host, seconds
                )
                out.append(rps)
    finally:
        pipeline.stop()
        proc.terminate()
        proc.wait()
    return result


@dataclass
class ChangeCost:
    services: int
    changes: int = 0
    cpu_seconds: float = 0.0  # the pipeline process and the children it waited for
    cpu_during: float = 0.0  # of which before the quiet period (the deferred check after)
    wall_seconds: float = 0.0
    misses: int = 0
    applies: int = 0
    reloads: int = 0
    check_cpu: float = 0.0  # one `haproxy -c` of the pipeline's live config (CPU seconds)

    @property
    def per_change(self) -> float | None:
        return self.cpu_seconds / self.changes if self.changes else None


async def _has_server(socket_path: Path, backend: str, name: str, want: bool) -> bool:
    try:
        text = await haproxy.command(socket_path, f"show servers state {backend}")
    except (OSError, TimeoutError):
        return not want
    return (f" {name} " in text) == want


async def p10_change_cost(
    env: Env, kind: str, services: int, changes: int = 40, quiet: float = 3.0
) -> ChangeCost:
    pipeline = make_pipeline(kind, env, f"/bench-p10-{kind}-{services}")
    prefix = pipeline.prefix
    result = ChangeCost(services)
    items = [
        (keys.instance_key(prefix, f"s{i:03d}", f"i{j}"), instance(env.p2[j]))
        for i in range(services)
        for j in range(2)
    ]
    try:
        await put_many(env.store, items)
        await start(pipeline)
        await _until_served(pipeline.http_port, [f"s{services - 1:03d}.localhost"], within=60)
        await asyncio.sleep(quiet + 12)  # past the start's own work (checks, pool refill)
        sock = pipeline.stats_socket()
        assert sock is not None
        before = pipeline.counts()
        cpu0, t0 = cpu_with_children(pipeline.pid), time.monotonic()
        key = keys.instance_key(prefix, "s000", "extra")
        for k in range(changes):
            adding = k % 2 == 0
            if adding:
                await env.store.put(key, instance(env.p2[2]))
            else:
                await env.store.delete(key)
            deadline = time.monotonic() + 10
            while not await _has_server(sock, "be_s000", "extra", adding):
                if time.monotonic() > deadline:
                    result.misses += 1
                    break
                await asyncio.sleep(0.005)
            result.changes += 1
            await asyncio.sleep(0.1)
        result.cpu_during = cpu_with_children(pipeline.pid) - cpu0
        await asyncio.sleep(quiet)
        result.cpu_seconds = cpu_with_children(pipeline.pid) - cpu0
        result.wall_seconds = time.monotonic() - t0
        after = pipeline.counts() - before
        result.applies, result.reloads = after.applies, after.reloads
        result.check_cpu = await check_cpu(pipeline.config_file)
    finally:
        pipeline.stop()
    return result


async def check_cpu(config: Path) -> float:
    """CPU seconds of one `haproxy -c` of `config`, from this process's children's
    rusage (the bench runs nothing else meanwhile)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        "haproxy", "-c", "-q", "-f", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
