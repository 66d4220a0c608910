"""The deploy commands of `fluster` (app, deploy, deploys, and rollback of an app).

Their options are in `deployer.options`; `fluster.cli` loads this module only when one
of them runs: the registry's core never imports the deployer. Exit codes follow
the CLI's: 0 done, 1 failed (the old version still serves), 2 bad arguments or no such
app, 3 conflict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import shlex
import shutil
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from deployer import apps, source
from deployer import options as D
from deployer.engine import STEP_ERRORS, Engine
from deployer.gitshell import KEY_ENV
from deployer.pipeline import Deployer
from deployer.progress import DeployFailed, Settings, Source
from deployer.records import AppConfig, DeployRecord
from deployer.scheduler import LocalScheduler, Scheduler
from deployer.swarm import SwarmScheduler
from fluster import ops
from fluster.docker import DockerError
from fluster.records import RecordError
from fluster.settings import (
    ETCD_CACERT,
    ETCD_CERT,
    ETCD_ENDPOINTS,
    ETCD_KEY,
    ETCD_USER,
    Option,
    Values,
)
from fluster.store import Conflict, Store
from fluster.text import printable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def say(text: str) -> None:
    print(text, flush=True)


def pusher() -> str:
    """Who deploys, for the record: the deploy key of a push, else the local user."""
    key = os.environ.get(KEY_ENV, "")
    return f"key {key}" if key else f"{getpass.getuser()}@{socket.gethostname()}"


class Terminal:
    """Where a deploy's progress goes: stdout, until whoever reads it is gone.

    A push's hook writes to `git receive-pack`, which relays to the pusher (over ssh, or
    to a local `git push`). When the pusher goes, receive-pack loses its parent (it is
    left waiting for the hook, reparented) and our writes may fail. The deploy then goes
    on silently (its record keeps every stage) and `gone()` says so, so the pipeline
    stops before the promotion: a push cut off changes nothing that serves.
    """

    def __init__(self, *, receive: bool) -> None:
        self.lost = False
        self.parent = os.getppid() if receive else None
        self.grandparent = parent_of(self.parent) if self.parent else None

    def __call__(self, text: str) -> None:
        if self.lost:
            return
        try:
            print(text, flush=True)
        except OSError:  # EPIPE: nobody reads any more; nothing else is worth raising
            self.lost = True

    def gone(self) -> bool:
        """The output broke, or (a push) receive-pack, or whoever started it, is gone."""
        if self.lost or self.parent is None:
            return self.lost
        return os.getppid() != self.parent or parent_of(self.parent) != self.grandparent


def parent_of(pid: int) -> int | None:
    """The parent of process `pid` (Linux /proc), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def fail(message: str, code: int) -> int:
    with contextlib.suppress(OSError):  # a push cut off: nobody to tell
        print(f"fluster: {printable(message, keep_newlines=True)}", file=sys.stderr, flush=True)
    return code


async def run(command: str, action: str, v: Values, store: Store, prefix: str) -> int:
    try:
        if command == "app":
            return await app_command(action, v, store, prefix)
        if command in ("deploys", "releases"):
            return await releases_command(v, store, prefix)
        if command == "gc":
            return await gc_command(v, store, prefix)
        if command in ("scale", "logs", "run", "retire"):
            from deployer import running

            return await running.run(command, v, store, prefix)
        return await deploy_command(command, v, store, prefix)
    except apps.NoSuchApp as exc:
        return fail(str(exc), EXIT_USAGE)
    except DeployFailed as exc:
        return fail(f"deploy failed: {exc}", EXIT_FAILED)
    except STEP_ERRORS as exc:
        return fail(str(exc), EXIT_FAILED)


def config_changes(v: Values, current: AppConfig | None) -> dict[str, Any]:
    """The app config fields given on the command line (AppConfig validates them)."""
    changes: dict[str, Any] = {}
    for opt in D.APP_FIELDS:
        value: Any = v[opt]
        special = (
            D.ENV, D.UNSET_ENV, D.SECRET, D.UNSET_SECRET, D.APP_KEEP_OLD, D.VOLUME,
            D.UNSET_VOLUME,
        )  # fmt: skip
        if opt not in special and value is not None:
            changes[opt.dest] = value
    if v[D.APP_KEEP_OLD] is not None:
        changes["keep_old"] = v[D.APP_KEEP_OLD]
    if v[D.ENV] or v[D.UNSET_ENV]:
        env = dict(current.env) if current else {}
        for item in v[D.ENV] or ():
            key, sep, value = item.partition("=")
            if not sep:
                raise RecordError("env", f"want NAME=VALUE, got {item!r}")
            env[key] = value
        for key in v[D.UNSET_ENV] or ():
            env.pop(key, None)
        changes["env"] = env
    if v[D.SECRET] or v[D.UNSET_SECRET]:
        secrets = dict(current.secrets) if current else {}
        for item in v[D.SECRET] or ():
            key, sep, value = item.partition("=")
            if not sep:
                if key not in os.environ:
                    raise RecordError(
                        "secrets", f"--secret {key}: no variable {key} in this environment"
                    )
                value = os.environ[key]
            secrets[key] = value
        for key in v[D.UNSET_SECRET] or ():
            secrets.pop(key, None)
        changes["secrets"] = secrets
    if v[D.VOLUME] or v[D.UNSET_VOLUME]:
        gone = set(v[D.UNSET_VOLUME] or ()) | {
            item.split(":")[1] for item in v[D.VOLUME] or () if ":" in item
        }
        kept = [
            vol for vol in (current.volumes if current else ()) if vol.split(":")[1] not in gone
        ]
        changes["volumes"] = [*kept, *(v[D.VOLUME] or ())]
    return changes


# -- fluster app ------------------------------------------------------------------------


def fluster_command() -> list[str]:
    """How the hook calls this very fluster (the venv's script, else the one on PATH)."""
    here = Path(sys.executable).with_name("fluster")
    if here.exists():
        return [str(here)]
    found = shutil.which("fluster")
    return [found] if found else [sys.executable, "-m", "fluster.cli"]


def hook_env(v: Values, prefix: str) -> dict[str, str]:
    """What the hook exports: the settings this command ran with (never the password)."""
    endpoints: tuple[str, ...] = v[ETCD_ENDPOINTS]
    env = {
        "ETCD_ENDPOINTS": ",".join(endpoints),
        "FLUSTER_PREFIX": prefix,
        "FLUSTER_REGISTRY": v[D.REGISTRY],
    }
    given: tuple[Option[Any], ...] = (D.NETWORK, D.PUBLISH_IP, D.DOCKER_HOST, *D.BUILD_LIMITS)
    for opt in given:
        if v.given(opt) and opt.env:
            value: object = v[opt]
            env[opt.env] = str(value)
    for tls in (ETCD_CACERT, ETCD_CERT, ETCD_KEY):
        path: Path | None = v[tls]
        if path is not None and tls.env:
            env[tls.env] = str(path.resolve())
    if v[ETCD_USER]:
        env["ETCD_USER"] = v[ETCD_USER]
    return env


async def app_command(action: str, v: Values, store: Store, prefix: str) -> int:
    if action == "ls":
        return await app_ls(v, store, prefix)
    app = v[D.APP]
    if action == "config":
        before = (await apps.load(store, prefix, app)).config
        changes = config_changes(v, before)
        if not changes:
            print(json.dumps(before.shown(), indent=2, sort_keys=True))
            return EXIT_OK
        after = await apps.edit(store, prefix, app, changes)
        say(f"{app}: config written")
        print(json.dumps(after.shown(), indent=2, sort_keys=True), flush=True)
        if v[D.NO_RESTART]:
            say(f"{app}: not restarted (--no-restart): the next release runs with it")
            return EXIT_OK
        from deployer import running

        if after.runtime() != before.runtime():
            try:
                async with running.deployer(v, store, prefix, app, after) as d:
                    if await d.reconfigure(app) is None:
                        say(f"{app}: no release runs yet; the first deploy runs with this config")
            except DeployFailed:
                # The release with it failed: the config goes back to what runs, so the
                # next push does not start from a config that was never healthy.
                if (await apps.load(store, prefix, app)).config == after:
                    await apps.edit(store, prefix, app, before.runtime())
                    say(f"{app}: config restored to what the active release runs")
                raise
        elif after.replicas != before.replicas:
            return await running.scale(v, store, prefix, app, after.replicas)
        return EXIT_OK
    # create: the config first (it validates every field), then the repository.
    try:
        config = await apps.create(store, prefix, app, config_changes(v, None))
        say(f"{app}: app created (service {config.service}, {config.replicas} replicas)")
    except Conflict:
        config = (await apps.load(store, prefix, app)).config
        say(f"{app}: the app exists; its repository and hook are made again")
    hook = source.hook_script(app, fluster_command(), hook_env(v, prefix))
    path, _ = await source.create_repo(Path(v[D.REPOS]), app, config.branch, hook)
    user = v[D.SSH_USER] or getpass.getuser()
    host = v[D.SSH_HOST] or socket.getfqdn()
    port = f":{v[D.SSH_PORT]}" if v[D.SSH_PORT] != 22 else ""
    say(f"repository: {path} (a push of {config.branch} deploys)")
    say(f"  git remote add production ssh://{user}@{host}{port}{path}")
    say(f"  git push production {config.branch}")
    say(f"on this host: git remote add production {shlex.quote(str(path))}")
    return EXIT_OK


async def app_ls(v: Values, store: Store, prefix: str) -> int:
    found = await apps.all_apps(store, prefix)
    snap = await ops.snapshot(store, prefix)
    rows = [["APP", "SERVICE", "REPLICAS", "BRANCH", "ACTIVE", "LAST DEPLOY"]]
    out: dict[str, Any] = {}
    for name, config in sorted(found.items()):
        if not isinstance(config, AppConfig):
            rows.append([name, f"(invalid config: {config})", "", "", "", ""])
            out[name] = {"error": str(config)}
            continue
        svc = snap.services.get(config.service)
        active = svc.spec.active_version if svc else None
        records = await apps.history(store, prefix, name)
        done = [r for r in records if isinstance(r, DeployRecord)]
        last = f"{done[-1].version} {done[-1].result}" if done else "-"
        rows.append(
            [name, config.service, str(config.replicas), config.branch, active or "-", last]
        )
        out[name] = {**config.shown(), "active_version": active, "last_deploy": last}
    if v[D.JSON]:
        print(json.dumps(out, indent=2, sort_keys=True))
    elif len(rows) > 1:
        table(rows)
    else:
        say("no apps (fluster app create APP)")
    return EXIT_OK


def table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# -- fluster releases ---------------------------------------------------------------


def _seconds(start: str, end: str | None) -> str:
    if end is None:
        return "-"
    return f"{(datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds():.1f}"


KIND_SHOWN = {"deploy": "code", "config": "config", "rollback": "rollback"}


async def releases_command(v: Values, store: Store, prefix: str) -> int:
    """`fluster releases APP` (and its old name `deploys`): every deploy of the app, newest
    last; a release has its number, a failed or refused deploy none."""
    app = v[D.APP]
    await apps.load(store, prefix, app)
    records = await apps.history(store, prefix, app)
    if v[D.JSON]:
        listing = [r.shown() if isinstance(r, DeployRecord) else {"error": str(r)} for r in records]
        print(json.dumps(listing, indent=2))
        return EXIT_OK
    rows = [["RELEASE", "KIND", "VERSION", "WHEN", "BY", "RESULT", "SECONDS", "STAGES (s)"]]
    for rec in records:
        if not isinstance(rec, DeployRecord):
            rows.append(["?", "", "", "", "", f"(invalid record: {rec})", "", ""])
            continue
        stages = " ".join(f"{s.name}:{_seconds(s.started, s.ended)}" for s in rec.stages)
        rows.append(
            [
                rec.name,
                KIND_SHOWN[rec.kind],
                rec.version,
                rec.started[:19].replace("T", " "),
                printable(f"{rec.author} ({rec.by})" if rec.author else rec.by) or "-",
                rec.result,
                _seconds(rec.started, rec.finished),
                printable(stages),
            ]
        )
    if len(rows) == 1:
        say(f"no releases of {app} yet")
        return EXIT_OK
    table(rows)
    failed = [r for r in records if isinstance(r, DeployRecord) and r.error]
    if failed:
        first = printable(failed[-1].error, keep_newlines=True).splitlines() or [""]
        say(f"\nlast error ({failed[-1].id}): {first[0]}")
    return EXIT_OK


# -- fluster deploy / rollback ----------------------------------------------------------


async def deploy_command(command: str, v: Values, store: Store, prefix: str) -> int:
    async with Engine(v[D.DOCKER_HOST] or None) as engine:
        settings = Settings(
            registry=v[D.REGISTRY],
            lock_timeout=v[D.LOCK_TIMEOUT],
            wait_timeout=v[D.DEPLOY_WAIT],
            by=pusher(),
        )
        if command != "rollback":  # a rollback builds nothing
            settings = dataclasses.replace(
                settings,
                build_timeout=v[D.BUILD_TIMEOUT],
                max_context=v[D.MAX_CONTEXT] * 2**20,
                build_network=v[D.BUILD_NETWORK],
                base_images=tuple(p.strip() for p in v[D.BASE_IMAGES].split(",") if p.strip()),
            )
        if command != "rollback" and bool(v[D.IMAGE]) == bool(v[D.GIT]):
            return fail("give one of --image IMAGE or --git DIR", EXIT_USAGE)
        app = v[D.SERVICE_ARG] if command == "rollback" else v[D.APP]
        # --scheduler wins; else the app's config says where its versions run.
        kind = (None if command == "rollback" else v[D.DEPLOY_SCHEDULER]) or (
            await apps.load(store, prefix, app)
        ).config.scheduler
        from deployer.running import scheduler_for

        scheduler = await scheduler_for(engine, app, kind, v)
        terminal = Terminal(receive=command != "rollback" and bool(v[D.RECEIVE]))
        if command != "rollback" and v[D.RECEIVE]:  # a push returns once the release serves
            from deployer.running import retire_later

            settings = dataclasses.replace(
                settings, retire_later=retire_later(fluster_command(), v[D.DOCKER_HOST])
            )
        d = Deployer(store, prefix, engine, scheduler, settings, terminal, gone=terminal.gone)
        if command == "rollback":
            await d.rollback(app, v[D.ROLLBACK_TO])
            return EXIT_OK
        src = Source(image=v[D.IMAGE])
        if v[D.GIT]:
            git_dir = source.git_dir_of(Path(v[D.GIT]))
            ref, update = v[D.REF], None
            if v[D.RECEIVE]:
                config = (await apps.load(store, prefix, app)).config
                update = source.pushed(sys.stdin.read().splitlines(), config.branch)
                if update is None:
                    say(f"fluster: accepted, not deployed (a push of {config.branch} deploys)")
                    return EXIT_OK
                ref = update.new
            if not ref:
                return fail("--git needs --ref REF (a branch, tag or commit)", EXIT_USAGE)
            src = Source(git_dir=git_dir, ref=ref, update=update)
        once = {opt.dest: v[opt] for opt in D.CANARY_FIELDS if v[opt] is not None}
        record = await d.deploy(
            app, src, promote=not v[D.NO_PROMOTE], canary=v[D.CANARY], analysis=once
        )
        return EXIT_OK if record.result != "failed" else EXIT_FAILED


def housekeeping_scheduler(engine: Engine, config: AppConfig) -> Scheduler:
    """Where the app's containers are, for removing some (gc, abandoned deploys)."""
    return SwarmScheduler(engine) if config.scheduler == "swarm" else LocalScheduler(engine)


async def clean_abandoned(v: Values, store: Store, prefix: str) -> None:
    """`fluster gc APP`'s first step: deploys of the app that died mid-way."""
    app = v[D.SERVICE_ARG]
    config = (await apps.load(store, prefix, app)).config
    async with Engine(v[D.DOCKER_HOST] or None) as engine:
        scheduler = housekeeping_scheduler(engine, config)
        await Deployer(store, prefix, engine, scheduler, Settings(), say).clean_abandoned(app)


async def gc_command(v: Values, store: Store, prefix: str) -> int:
    """`fluster gc APP`, after the records (whose keep-old check it shares): the stopped
    containers (or scaled-down Swarm services) of versions the spec no longer routes."""
    app = v[D.SERVICE_ARG]
    config = (await apps.load(store, prefix, app)).config
    svc = (await ops.snapshot(store, prefix)).services.get(config.service)
    if svc is None:
        return EXIT_OK
    spec = svc.spec
    async with Engine(v[D.DOCKER_HOST] or None) as engine:
        scheduler = housekeeping_scheduler(engine, config)
        if v[D.DRY_RUN]:
            idle = {
                r.version
                for r in await scheduler.instances(app)
                if r.state != "running" and not spec.routes_version(r.version)
            }
            say(f"{app}: would remove the stopped instances of {', '.join(sorted(idle)) or '-'}")
            return EXIT_OK
        removed = await scheduler.remove(app, keep=spec.routes_version)
        say(f"{app}: removed {removed} stopped instance(s) of versions no longer routed")
        images = await remove_images(
            engine, v[D.REGISTRY], app, await apps.history(store, prefix, app)
        )
    say(f"{app}: removed {len(images)} image(s) older than its last {apps.KEEP_RELEASES} releases")
    for image in images:
        say(f"  {image}")
    return EXIT_OK


async def remove_images(
    engine: Engine, registry: str, app: str, history: list[DeployRecord | RecordError]
) -> list[str]:
    """The app's images on this engine that none of its last KEEP_RELEASES releases (nor
    a deploy still waiting or running) runs; one a container still uses is kept (Docker
    refuses). The registry keeps every image: a rollback finds it there."""
    keep = {r.image for r in apps.releases(history)[-apps.KEEP_RELEASES :]}
    keep |= {
        r.image
        for r in history
        if isinstance(r, DeployRecord) and r.result in ("running", "waiting")
    }
    gone = []
    for tag in await engine.tags_of(f"{registry.rstrip('/')}/{app}"):
        if tag in keep:
            continue
        try:
            await engine.untag(tag)
        except DockerError:
            continue  # in use by a container (a stopped one kept for a rollback)
        gone.append(tag)
    return gone
