"""`fluster logs APP`: every instance's output, each line prefixed with its release and
instance, interleaved by time.

Docker timestamps every line it keeps (RFC 3339, nanoseconds), so the lines already
logged are sorted by those; with `--follow` the new ones are printed as they arrive from
all instances at once. On a swarm the manager collects every node's tasks (`docker
service logs`), one stream per version's service.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from deployer import apps
from deployer import options as D
from deployer.engine import STEP_ERRORS, Engine, mapped
from deployer.records import AppConfig, DeployRecord
from deployer.scheduler import APP_LABEL
from deployer.swarm import VERSION_LABEL
from fluster import ops
from fluster.ops import parse_keep_old
from fluster.records import RecordError
from fluster.settings import Values
from fluster.store import Store

DEFAULT_TAIL = 100
COLOURS = (36, 33, 32, 35, 34, 91, 92, 93, 94, 95, 96)


@dataclass(frozen=True, slots=True)
class Source:
    """One stream of lines: a container (local) or a version's service (swarm)."""

    ref: str
    label: str  # `v7 web-3f2a9c1d4e5f-a1b2c3`: its release and instance
    swarm: bool = False


@dataclass(frozen=True, slots=True)
class Line:
    stamp: str
    label: str
    text: str


def split_stamp(line: str) -> tuple[str, str]:
    """`2026-12-07T10:00:00.123456789Z text` -> (stamp, text)."""
    stamp, _, text = line.partition(" ")
    return (stamp, text) if stamp[:2].isdigit() and stamp.endswith("Z") else ("", line)


def swarm_line(line: str) -> tuple[str, str, str]:
    """A `service logs` line with details: (stamp, task id, text)."""
    stamp, rest = split_stamp(line)
    details, _, text = rest.partition(" ")
    task = next(
        (
            kv.partition("=")[2][:12]
            for kv in details.split(",")
            if kv.startswith("com.docker.swarm.task.id=")
        ),
        "",
    )
    return (stamp, task, text) if task else (stamp, "", rest)


async def sources(
    engine: Engine, app: str, config: AppConfig, release: str, history: list[DeployRecord]
) -> list[Source]:
    """The streams to read: the running instances (or those of `release`, stopped too)."""
    version = ""
    names = {r.version: r for r in history}
    if release:
        found = apps.find_release(list(history), release)
        if found is None:
            raise LookupError(f"{app} has no release {release!r}")
        version = found.version
    if config.scheduler == "swarm":
        async with mapped("list services (is this engine a swarm manager?)"):
            services = await engine.client.services.list(filters={"label": f"{APP_LABEL}={app}"})
        return [
            Source(str(s["Spec"]["Name"]), _release_of(names, v), swarm=True)
            for s in services
            if (v := str(s["Spec"]["Labels"].get(VERSION_LABEL, "")))
            and (v == version if version else True)
        ]
    return [
        Source(c.id, f"{_release_of(names, v)} {c.name}")
        for c in await engine.containers({APP_LABEL: app})
        if (v := c.labels.get(VERSION_LABEL, ""))
        and (v == version if version else c.state == "running")
    ]


def _release_of(names: dict[str, DeployRecord], version: str) -> str:
    rec = names.get(version)
    return rec.name if rec is not None else version[:12]


async def read(
    engine: Engine, src: Source, tail: int | str, since: float, follow: bool
) -> AsyncIterator[Line]:
    if not src.swarm:
        async for raw in engine.follow(src.ref, tail=tail, since=since, follow=follow):
            stamp, text = split_stamp(raw)
            yield Line(stamp, src.label, text)
        return
    async for raw in engine.service_follow(src.ref, tail=tail, since=since, follow=follow):
        stamp, task, text = swarm_line(raw)
        yield Line(stamp, f"{src.label} {src.ref}.{task}" if task else src.label, text)


class Printer:
    """`label | text`, the label coloured per instance on a terminal."""

    def __init__(self, colour: bool, write: Callable[[str], None]) -> None:
        self.colour, self.write = colour, write
        self.colours: dict[str, int] = {}

    def __call__(self, line: Line) -> None:
        label = line.label
        if self.colour:
            code = self.colours.setdefault(label, COLOURS[len(self.colours) % len(COLOURS)])
            label = f"\033[{code}m{label}\033[0m"
        self.write(f"{label} | {line.text}")


def since_seconds(text: str) -> float:
    """`--since 10m` -> the Unix time ten minutes ago; "" -> 0 (all)."""
    if not text:
        return 0.0
    try:
        delta = parse_keep_old(text)
    except ValueError as exc:
        raise RecordError("--since", f"{exc} (e.g. 90s, 10m, 2h, 1d)") from None
    return (datetime.now(UTC) - delta).timestamp()


async def command(v: Values, store: Store, prefix: str, app: str) -> int:
    config = (await apps.load(store, prefix, app)).config
    history = apps.releases(await apps.history(store, prefix, app))
    since = since_seconds(v[D.SINCE])
    given: int | None = v[D.TAIL]
    tail: int | str = given if given is not None else ("all" if since else DEFAULT_TAIL)
    follow = v[D.FOLLOW]
    out = Printer(sys.stdout.isatty(), lambda text: print(text, flush=follow))
    async with Engine(v[D.DOCKER_HOST] or None) as engine:
        try:
            found = await sources(engine, app, config, v[D.RELEASE], history)
        except LookupError as exc:
            print(f"fluster: {exc}", file=sys.stderr)
            return 2
        if not found:
            svc = (await ops.snapshot(store, prefix)).services.get(config.service)
            active = svc.spec.active_version if svc else None
            print(f"fluster: no instances of {app} to read (active version: {active or '-'})",
                  file=sys.stderr)  # fmt: skip
            return 1
        if not follow:
            lines = []
            for src in found:
                lines += [line async for line in read(engine, src, tail, since, False)]
            for line in sorted(lines, key=lambda line: line.stamp):
                out(line)
            return 0
        await Follower(engine, out, tail, since).run(found, app, config, history)
        return 0


class Follower:
    """`--follow`: every source's new lines as they arrive; on one engine, the app's
    containers that start meanwhile (a deploy, a scale-up, a restart) join in."""

    def __init__(self, engine: Engine, out: Printer, tail: int | str, since: float) -> None:
        self.engine, self.out = engine, out
        self.tail, self.since = tail, since
        self.queue: asyncio.Queue[Line] = asyncio.Queue()
        self.followed: set[str] = set()
        self.tasks: list[asyncio.Task[None]] = []

    def add(self, src: Source, tail: int | str) -> None:
        if src.ref not in self.followed:
            self.followed.add(src.ref)
            self.tasks.append(asyncio.create_task(self.pump(src, tail)))

    async def pump(self, src: Source, tail: int | str) -> None:
        try:
            async for line in read(self.engine, src, tail, self.since, True):
                await self.queue.put(line)
        except STEP_ERRORS as exc:
            await self.queue.put(Line("", src.label, f"(stream ended: {exc})"))

    async def joiners(self, app: str, history: list[DeployRecord]) -> None:
        names = {r.version: r for r in history}
        async for event in self.engine.events():
            if event.action == "start" and event.labels.get(APP_LABEL) == app:
                version = event.labels.get(VERSION_LABEL, "")
                self.add(Source(event.id, f"{_release_of(names, version)} {event.name}"), "all")

    async def run(
        self, found: list[Source], app: str, config: AppConfig, history: list[DeployRecord]
    ) -> None:
        for src in found:
            self.add(src, self.tail)
        watcher = None
        if config.scheduler != "swarm":
            watcher = asyncio.create_task(self.joiners(app, history))
        try:
            while True:
                self.out(await self.queue.get())
        finally:
            for task in [*self.tasks, *([watcher] if watcher else [])]:
                task.cancel()
