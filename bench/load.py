"""Sustained load for P3: wrk for keep-alive clients, hey for new-connection clients.

Both run until told to stop (SIGINT makes each print its summary), so the load covers the
whole reload loop however long it takes. Failures are counted by the tools themselves:
wrk's socket errors and non-2xx responses (wrk never retries, so a keep-alive connection
closed under a request is a failure), hey's error and status-code distributions (one TCP
connection per request, so nothing is hidden by Go's retry of reused connections).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

WRK_DELAY = Path(__file__).with_name("wrk_delay.lua")


@dataclass
class LoadResult:
    tool: str
    command: str
    requests: int = 0
    failures: int = 0
    detail: str = ""


class Load:
    def __init__(self, argv: list[str], tool: str) -> None:
        self.argv = argv
        self.tool = tool
        self.proc: subprocess.Popen[str] | None = None

    @property
    def command(self) -> str:
        return shlex.join(self.argv)

    def start(self) -> Load:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        return self

    def stop(self) -> LoadResult:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        parse = parse_wrk if self.tool == "wrk" else parse_hey
        return parse(out, LoadResult(self.tool, self.command))


def keepalive(url: str, host: str, connections: int) -> Load:
    script = os.path.relpath(WRK_DELAY)  # shorter in the doc when run from the repo
    argv = ["wrk", "-t1", f"-c{connections}", "-d600s", "-s", script]
    return Load([*argv, "-H", f"Host: {host}", url], "wrk")


def new_connections(url: str, host: str, workers: int, rate: int) -> Load:
    argv = ["hey", "-z", "600s", "-c", str(workers), "-q", str(rate), "-disable-keepalive"]
    return Load([*argv, "-host", host, url], "hey")


def parse_wrk(out: str, result: LoadResult) -> LoadResult:
    if m := re.search(r"(\d+) requests in", out):
        result.requests = int(m.group(1))
    errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors = sum(int(g) for g in m.groups())
        result.detail = m.group(0)
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
        result.detail = (result.detail + "; " + m.group(0)).strip("; ")
    result.failures = errors
    if not result.requests:
        result.detail = "no output: " + out[-300:]
    return result


def parse_hey(out: str, result: LoadResult) -> LoadResult:
    statuses = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", out))
    ok = sum(int(n) for code, n in statuses.items() if code.startswith("2"))
    bad = sum(int(n) for code, n in statuses.items() if not code.startswith("2"))
    errors = 0
    if "Error distribution:" in out:
        tail = out.split("Error distribution:", 1)[1]
        errs = re.findall(r"\[(\d+)\]\s+(.+)", tail)
        errors = sum(int(n) for n, _ in errs)
        kinds = sorted({_error_kind(msg) for _, msg in errs})
        result.detail = "errors: " + ", ".join(kinds)
    if bad:
        result.detail = (result.detail + f"; non-2xx: {bad}").strip("; ")
    result.requests = ok + bad + errors
    result.failures = bad + errors
    return result


def _error_kind(message: str) -> str:
    for kind in ("connection refused", "connection reset", "EOF", "timeout", "broken pipe"):
        if kind.lower() in message.lower():
            return kind
    return message[-60:]
