"""H1: HTTPS at the edge. A certificate put in etcd -> served on a new TLS handshake, and
TLS handshakes per second with 1 vs 200 certificates loaded.

One reloader (`reloader run --https-bind`) on its own prefix; one HTTP service whose
host is `localhost` (so hey can reach it by name, SNI included, without touching the
resolver) with `https: on`. Every trial rotates its certificate: the latency runs from
just before the etcd put until a new handshake presents the new certificate; the
master's `show proc` reload counter before and after says whether any rotation cost a
reload. Handshake rate: hey with keep-alive off (one TLS handshake per request),
alternating between 1 certificate and 200 (199 others for other names, added and
removed through etcd, so through the runtime API), three rounds each.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.pipelines import Ours
from bench.report import Row, ms
from bench.scenarios import Env, Latencies, instance, start
from fluster import keys
from fluster.certs import Certificate, self_signed
from reloader.haproxy import HaproxyError, cli, parse_show_proc
from reloader.state_dir import StateDir
from testbed.ports import free_port

PREFIX = "/bench-https"
OTHERS = 199
ROUNDS = 5
HEY_SECONDS = 4
TRIAL_GAP = 0.2  # seconds between rotations


class OursHttps(Ours):
    def __init__(self, workdir: Path, env: Env) -> None:
        super().__init__(workdir, env.etcd.endpoints, PREFIX, free_port(), free_port())
        self.https_port = free_port()

    def fresh_ports(self) -> None:
        super().fresh_ports()
        self.https_port = free_port()

    def command(self) -> list[str]:
        return [*super().command(), "--https-bind", f"127.0.0.1:{self.https_port}"]


@dataclass
class HttpsFigures:
    rotate: Latencies = field(default_factory=Latencies)
    reloads: int = 0
    rates: dict[int, list[float]] = field(default_factory=dict)  # certs loaded -> rates
    failures: int = 0  # hey errors over every rate run
    errors: list[str] = field(default_factory=list)


def _pem() -> str:
    cert, key = self_signed(["localhost"], days=30)
    return cert + key


async def served_fingerprint(port: int) -> str | None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
    except (OSError, ssl.SSLError):
        return None
    try:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if obj else None
    finally:
        writer.close()
    if der is None:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()


async def until_served(port: int, fingerprint: str, within: float) -> float | None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await served_fingerprint(port) == fingerprint:
            return time.monotonic()
        await asyncio.sleep(0.001)
    return None


async def reloads(p: OursHttps, within: float = 10.0) -> int:
    """The master's reload counter (its socket is briefly away while it re-executes)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return parse_show_proc(
                await cli(StateDir(p.state_dir).master_socket, "show proc")
            ).reloads
        except HaproxyError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def hey_rate(port: int) -> tuple[float, int]:
    out = subprocess.run(
        [
            "hey",
            "-z",
            f"{HEY_SECONDS}s",
            "-c",
            "8",
            "-disable-keepalive",
            f"https://localhost:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=HEY_SECONDS + 60,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Error distribution:\n((?:\s+\[\d+\].*\n?)+)", out)
    failed = sum(int(n) for n in re.findall(r"\[(\d+)\]", errors.group(1))) if errors else 0
    return (float(rate.group(1)) if rate else 0.0), failed


async def certs_loaded(p: OursHttps, count: int, within: float = 60.0) -> None:
    url = f"http://127.0.0.1:{p.status_port}/status"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            out = await asyncio.to_thread(subprocess.run, ["curl", "-s", url], capture_output=True)
            status = json.loads(out.stdout)
            if len(status.get("certificates", {})) == count and status.get("tls_applies", 0):
                await asyncio.sleep(0.5)  # the apply after the count: give the API a moment
                return
        except ValueError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{count} certificates not loaded within {within}s")


async def h1_https(env: Env, trials: int) -> HttpsFigures:
    figures = HttpsFigures()
    workdir = env.work / "https"
    workdir.mkdir(parents=True, exist_ok=True)
    p = OursHttps(workdir, env)
    store = env.store
    await store.put(
        keys.spec_key(PREFIX, "web"), json.dumps({"hosts": ["localhost"], "https": "on"})
    )
    await store.put(keys.instance_key(PREFIX, "web", "a"), instance(env.backends.ports[0]))
    first = _pem()
    await store.put(keys.cert_key(PREFIX, "web"), first)
    try:
        await start(p)
        served = await until_served(p.https_port, Certificate.parse("web", first).fingerprint, 30.0)
        if served is None:
            raise TimeoutError(f"HTTPS not served within 30s\n{p.tail_log()}")
        pems = [_pem() for _ in range(trials)]
        before = await reloads(p)
        for text in pems:
            # A rotation is a lone change: one closer than the debounce's quiet period
            # (50 ms) to the previous would be coalesced and wait that period out.
            await asyncio.sleep(TRIAL_GAP)
            fp = Certificate.parse("web", text).fingerprint
            started = time.monotonic()
            await store.put(keys.cert_key(PREFIX, "web"), text)
            done = await until_served(p.https_port, fp, 5.0)
            if done is None:
                figures.rotate.misses += 1
            else:
                figures.rotate.samples.append(done - started)
        figures.reloads = await reloads(p) - before
        others = [
            (keys.cert_key(PREFIX, f"other{i:03d}"), "".join(self_signed([f"s{i}.test"])))
            for i in range(OTHERS)
        ]
        figures.rates = {1: [], 1 + OTHERS: []}
        for _ in range(ROUNDS):
            for count in (1, 1 + OTHERS):
                if count == 1:
                    await store.delete(keys.certs_prefix(PREFIX) + "other", prefix=True)
                else:
                    for key, value in others:
                        await store.put(key, value)
                await certs_loaded(p, count)
                rate, failed = await asyncio.to_thread(hey_rate, p.https_port)
                figures.rates[count].append(rate)
                figures.failures += failed
    finally:
        p.stop()
        await store.delete(PREFIX + "/", prefix=True)
    return figures


def row(command: str, f: HttpsFigures, trials: int) -> Row:
    lat = f.rotate
    one, many = (statistics.median(f.rates.get(n) or [0.0]) for n in (1, 1 + OTHERS))
    ratio_value = many / one if one else 0.0
    ok_latency = bool(lat.samples) and lat.p99 <= 0.100 and not lat.misses  # type: ignore[operator]
    ok = ok_latency and f.reloads == 0 and ratio_value >= 0.95
    ours = (
        f"put -> served p50 {ms(lat.p50)} / p99 {ms(lat.p99)}, {f.reloads} reloads; "
        f"handshakes/s {one:,.0f} (1 cert) vs {many:,.0f} (200 certs), ratio {ratio_value:.2f}"
        if lat.samples
        else f"no sample ({lat.misses} misses)"
    )
    notes = [
        "Latency = from just before the etcd put of a new certificate for `localhost` until a "
        "new TLS handshake (SNI localhost) presents it; each trial is one rotation through the "
        "runtime API (`set ssl cert` + `commit ssl cert`), 200 ms after the previous one "
        "(a lone change, not coalesced by the debounce). Reloads = the master's `show proc` "
        "reload counter over all trials.",
        f"rotation: {len(lat.samples)} samples, min {ms(min(lat.samples or [0]))}, "
        f"p50 {ms(lat.p50)}, p99 {ms(lat.p99)}, max {ms(lat.worst)}, missed {lat.misses}",
        f"handshakes/s: `hey -z {HEY_SECONDS}s -c 8 -disable-keepalive https://localhost:PORT/` "
        f"(one full TLS handshake + one request per connection), {ROUNDS} rounds alternating "
        f"1 and 200 certificates: 1 cert {[round(r) for r in f.rates.get(1, [])]}, 200 certs "
        f"{[round(r) for r in f.rates.get(1 + OTHERS, [])]} (medians compared); hey errors "
        f"{f.failures}.",
        "hey, HAProxy and the reloader share the 2 cores: the rate is bounded by the client's "
        "handshake work as much as HAProxy's.",
    ]
    return Row(
        key="H1",
        what=f"HTTPS: certificate put -> served on a new handshake ({trials} rotations); "
        "handshakes/s with 1 vs 200 certificates",
        goal="<= 100 ms, 0 reloads; ratio >= 0.95",
        ours=ours,
        verdict="yes" if ok else "**no**",
        command=command,
        notes=notes + f.errors,
    )
