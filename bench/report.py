"""Rows, the markdown table, the machine line and docs/BENCHMARKS.md."""

from __future__ import annotations

import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One line of the table; `ours`/`baseline` are already-formatted figures."""

    key: str
    what: str
    goal: str
    ours: str
    baseline: str = "-"
    ratio: str = "-"
    verdict: str = "?"  # "met", "MISSED", "n/a"
    command: str = ""
    notes: list[str] = field(default_factory=list)


def ratio(ours: float | None, baseline: float | None) -> str:
    if ours is None or baseline is None or baseline == 0:
        return "-"
    return f"{ours / baseline:.2f}"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def table(rows: list[Row]) -> str:
    out = [
        "| row | measure | goal | fluster | baseline | ours/baseline | goal met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.key} | {r.what} | {r.goal} | {r.ours} | {r.baseline} | {r.ratio} | {r.verdict} |"
        )
    return "\n".join(out)


def _first_line(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except OSError as exc:
        return f"unavailable ({exc})"
    return (result.stdout or result.stderr).strip().splitlines()[0]


def machine() -> str:
    cpu = "unknown cpu"
    text = Path("/proc/cpuinfo").read_text()
    if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
        cpu = m.group(1).strip()
    cores = len(re.findall(r"^processor\s*:", text, re.M))
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    haproxy = _first_line(["haproxy", "-v"]).split(" - ")[0]
    etcd = _first_line(["etcd", "--version"])
    return (
        f"{cpu}, {cores} cores, {mem_kb // 1024} MiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}, {haproxy}, {etcd}"
    )


def document(
    rows: list[Row], *, machine_line: str, command: str, started: str, took: float, notes: list[str]
) -> str:
    parts = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`.venv/bin/python -m bench`); do not edit by hand. "
        "Timing claims live here and in bench/, never in pass/fail tests.",
        "",
        f"- run: `{command}`, started {started}, took {took / 60:.1f} min",
        f"- machine: {machine_line}",
        "- load: loopback only (127.0.0.1); HAProxy, the reloader, etcd, the backends and the "
        "load generators all share the same cores, so every figure includes that contention.",
        "",
        table(rows),
        "",
        "## Rows: how each was produced",
        "",
    ]
    for r in rows:
        parts.append(f"### {r.key}: {r.what}")
        parts.append("")
        parts.append(f"Command: `{r.command}`")
        parts.append("")
        parts.extend(f"- {n}" for n in r.notes)
        parts.append("")
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


_ROW = re.compile(r"^\| ([\w-]+) \|")


def merge(
    old: str, rows: list[Row], *, order: tuple[str, ...], run_line: str, notes: list[str]
) -> str:
    """`old` (a document this module wrote) with `rows` replacing or joining its rows of
    the same keys: a run of some rows (`--only`) updates the document instead of
    dropping the rows it did not run. `run_line` and `notes` say which rows this run
    wrote and under what conditions."""
    head, _, rest = old.partition("\n| row |")
    table_part, _, body = ("| row |" + rest).partition("\n\n## Rows: how each was produced\n")
    old_rows = {
        m.group(1): line
        for line in table_part.splitlines()
        if (m := _ROW.match(line)) and m.group(1) != "row"  # not the header
    }
    sections_part, _, old_notes = body.partition("\n## Notes\n")
    sections: dict[str, str] = {}
    for block in ("\n" + sections_part).split("\n### ")[1:]:
        sections[block.split(":", 1)[0]] = "### " + block.rstrip("\n") + "\n"
    for r in rows:
        old_rows[r.key] = table([r]).splitlines()[-1]
        lines = [f"### {r.key}: {r.what}", "", f"Command: `{r.command}`", ""]
        sections[r.key] = "\n".join(lines + [f"- {n}" for n in r.notes]) + "\n"
    keys = [k for k in order if k in old_rows] + sorted(set(old_rows) - set(order))
    out = [head.rstrip("\n") + "\n" + f"- {run_line}", ""]
    out += table([]).splitlines() + [old_rows[k] for k in keys]
    out += ["", "## Rows: how each was produced", ""]
    out += [sections[k] for k in keys if k in sections]
    # Notes of an earlier run of the same rows give way to this run's.
    stale = tuple({f"- {n.split(': ', 1)[0]}: " for n in notes if ": " in n})
    note_lines = [n for n in old_notes.strip().splitlines() if n.strip()]
    note_lines = [n for n in note_lines if not (stale and n.startswith(stale))]
    note_lines += [f"- {n}" for n in notes]
    out += ["## Notes", "", *note_lines, ""]
    return "\n".join(out)
