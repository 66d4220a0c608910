"""What one sidekick costs at rest: memory, CPU, and etcd requests per minute.

    python -m bench.sidekick_footprint [--window 60] [--ttl 10] [--docker] [--image IMG]

Starts a private etcd, one static sidekick (and with --docker a host agent following one
labelled container, then a companion beside an unlabelled one; with --image the static
sidekick as its image runs it, on Debian's Python), waits for the registration,
then measures over the window: RSS and PSS (/proc), CPU (utime+stime), and the gRPC
messages etcd received (its /metrics, `grpc_server_msg_received_total`), per method.
The goal (issue 3): RSS <= 40 MB, one LeaseKeepAlive per TTL/3 and nothing else.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from testbed.etcd import Etcd

SIDEKICK = [sys.executable, "-m", "sidekick.cli"]
DOCKER = "/usr/bin/docker"


def sidekick_pid(container: str) -> int:
    """The host pid of the sidekick in `container` (under its image's tini)."""
    top = subprocess.run([DOCKER, "top", container, "-o", "pid,args"], capture_output=True,
                         text=True, check=True).stdout.splitlines()[1:]  # fmt: skip
    for line in top:
        pid, _, args = line.strip().partition(" ")
        if "sidekick" in args and "tini" not in args:
            return int(pid)
    raise RuntimeError(f"no sidekick process in {container}: {top}")


def etcd_messages(etcd: Etcd) -> Counter[str]:
    url = f"http://{etcd.members[0].endpoint}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:  # loopback only
        text = reply.read().decode()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("grpc_server_msg_received_total{"):
            labels, value = line.rsplit(" ", 1)
            method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
            counts[method] += int(float(value))
    return counts


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB: PSS shares library pages fairly between processes."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    etcd: Etcd,
    name: str,
    argv: list[str],
    key: str,
    window: float,
    work: Path,
    expect: int = 1,
    image: str | None = None,
) -> dict[str, object]:
    env = {
        **os.environ,
        "ETCD_ENDPOINTS": etcd.endpoints,
        "SIDEKICK_STATE_DIR": str(work / re.sub(r"[^A-Za-z0-9]+", "-", name)),
        "SIDEKICK_LOG_LEVEL": "warning",
    }
    logfile = work / (re.sub(r"[^A-Za-z0-9]+", "-", name) + ".log")
    with open(logfile, "ab") as log:
        if image:
            variables = [
                f"--env={k}={v}" for k, v in env.items() if k.startswith(("ETCD_", "SIDEKICK_L"))
            ]
            command = [DOCKER, "run", "--rm", "--network", "host", "--name",
                       f"footprint-{os.getpid()}", "--env=SIDEKICK_ALL=0", *variables, image,
                       *argv]  # fmt: skip
        else:
            command = [*SIDEKICK, *argv]
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while len(etcd.ctl("get", "--prefix", key, "--keys-only").stdout.split()) < expect:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} never registered: {logfile.read_text()}")
            time.sleep(0.1)
        pid = sidekick_pid(f"footprint-{os.getpid()}") if image else proc.pid
        time.sleep(3)  # start-up done: the steady state only
        m0, c0, t0 = etcd_messages(etcd), cpu_seconds(pid), time.monotonic()
        time.sleep(window)
        m1, c1, t1 = etcd_messages(etcd), cpu_seconds(pid), time.monotonic()
        rss, pss = memory_kb(pid)
    finally:
        if image:
            subprocess.run([DOCKER, "stop", f"footprint-{os.getpid()}"], capture_output=True)
        proc.terminate()
        proc.wait(30)
    minutes = (t1 - t0) / 60
    per_min = {m: (m1[m] - m0[m]) / minutes for m in m1 if m1[m] != m0[m]}
    return {
        "mode": name,
        "instances": expect,
        "rss_mb": rss / 1024,
        "pss_mb": pss / 1024,
        "cpu_pct": 100 * (c1 - c0) / (t1 - t0),
        "per_min": per_min,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured")
    parser.add_argument("--ttl", type=int, default=10)
    parser.add_argument(
        "--docker", action="store_true", help="also the host agent (--all) and a companion"
    )
    parser.add_argument("--containers", type=int, default=1, help="for the host agent")
    parser.add_argument("--image", help="also the static sidekick in this image (host network)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sidekick-bench-") as tmp:
        work = Path(tmp)
        etcd = Etcd(work / "etcd").start()
        try:
            rows.append(
                measure(
                    etcd,
                    "static",
                    ["--service", "bench", "--address", "127.0.0.1:9", "--ttl", str(args.ttl)],
                    "/fluster/services/bench/",
                    args.window,
                    work,
                )
            )
            if args.image:
                rows.append(
                    measure(etcd, f"static, in {args.image}",
                            ["--service", "benchimage", "--address", "127.0.0.1:9", "--ttl",
                             str(args.ttl)],
                            "/fluster/services/benchimage/", args.window, work,
                            image=args.image)
                )  # fmt: skip
            if args.docker:
                rows.extend(docker_row(etcd, args, work))
        finally:
            etcd.stop()
    print(
        f"| mode | RSS MB | PSS MB | idle CPU % | etcd msgs/min per instance (TTL {args.ttl} s) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        per_min, n = r["per_min"], r["instances"]
        assert isinstance(per_min, dict) and isinstance(n, int)
        methods = ", ".join(f"{m} {v / n:.1f}" for m, v in sorted(per_min.items())) or "none"
        print(
            f"| {r['mode']} | {r['rss_mb']:.1f} | {r['pss_mb']:.1f} | {r['cpu_pct']:.2f} "
            f"| {sum(per_min.values()) / n:.1f} ({methods}) |"
        )
    return 0


def docker_row(etcd: Etcd, args: argparse.Namespace, work: Path) -> list[dict[str, object]]:
    """The host agent following `--containers` labelled containers, then a companion
    sidekick (`--container`) beside one unlabelled container."""
    from testbed.docker import BASE_IMAGE, docker_cmd

    def run(*labels: str) -> str:
        return docker_cmd("run", "-d", *labels, "-p", "127.0.0.1::8000", BASE_IMAGE,
                          "python3", "-m", "http.server", "8000").stdout.strip()  # fmt: skip

    labelled = ("--label", "fluster.service=benchdocker", "--label", "fluster.port=8000")
    ids = [run(*labelled) for _ in range(args.containers)]
    try:
        rows = [measure(etcd, f"host agent (--all, {args.containers} containers)",
                        ["--all", "--ttl", str(args.ttl), "--check", "none"],
                        "/fluster/services/benchdocker/", args.window, work,
                        expect=args.containers)]  # fmt: skip
        ids.append(alone := run())
        rows.append(measure(etcd, "companion (--container)",
                            ["--container", alone, "--service", "benchcompanion", "--port",
                             "8000", "--ttl", str(args.ttl), "--check", "none"],
                            "/fluster/services/benchcompanion/", args.window, work))  # fmt: skip
        return rows
    finally:
        docker_cmd("rm", "-f", *ids, check=False)


if __name__ == "__main__":
    sys.exit(main())
