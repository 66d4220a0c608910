"""An app from day to day: `fluster scale`, `logs`, `run`, and the retirement a push
leaves running in the background (`fluster retire`).

These act on the app's active release (the newest release of the version its service
routes to), on whichever scheduler the app's config names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

from deployer import apps, logs, oneoff
from deployer import options as D
from deployer.engine import DeployError, Engine
from deployer.gate import short
from deployer.lock import deploy_lock
from deployer.pipeline import Deployer
from deployer.progress import DeployFailed, Settings
from deployer.records import AppConfig
from deployer.scheduler import APP_LABEL, LocalScheduler, Release, Scheduler
from deployer.swarm import SwarmScheduler
from fluster import keys, ops, release
from fluster.records import Instance, RecordError
from fluster.settings import Values
from fluster.store import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def say(text: str) -> None:
    print(text, flush=True)


async def scheduler_for(engine: Engine, app: str, scheduler: str, v: Values) -> Scheduler:
    """The app's scheduler. On one engine, the publish address and network are what the
    command was given, else what the app's running containers use (a push's hook set
    them with FLUSTER_PUBLISH_IP / FLUSTER_NETWORK; an operator's shell may not have
    them), else the defaults: a config release or a scale-up lands where the others are."""
    if scheduler == "swarm":
        return SwarmScheduler(engine)
    publish_ip, network = v.get(D.PUBLISH_IP, "127.0.0.1"), v.get(D.NETWORK, "")
    if not (v.given(D.PUBLISH_IP) and v.given(D.NETWORK)):
        seen_ip, seen_network = await placement(engine, app)
        publish_ip = publish_ip if v.given(D.PUBLISH_IP) else seen_ip or publish_ip
        network = network if v.given(D.NETWORK) else seen_network or network
    return LocalScheduler(engine, publish_ip=publish_ip, network=network)


async def placement(engine: Engine, app: str) -> tuple[str, str]:
    """(publish address, network) of a running container of the app; ("", "") if none."""
    for c in await engine.containers({APP_LABEL: app}):
        if c.state != "running":
            continue
        info = await engine.inspect(c.id)
        ips = [ip for bindings in info.ports.values() for ip, _ in bindings]
        mode = info.network_mode
        return (ips[0] if ips else ""), ("" if mode in ("", "default", "bridge") else mode)
    return "", ""


@contextlib.asynccontextmanager
async def deployer(
    v: Values, store: Store, prefix: str, app: str, config: AppConfig, by: str = ""
) -> AsyncIterator[Deployer]:
    """A Deployer for a release that builds nothing (config, rollback, retire)."""
    from deployer.cli import pusher

    default = Settings()
    settings = Settings(
        registry=v.get(D.REGISTRY, default.registry),
        lock_timeout=v.get(D.LOCK_TIMEOUT, default.lock_timeout),
        wait_timeout=v.get(D.DEPLOY_WAIT, default.wait_timeout),
        by=by or pusher(),
    )
    async with Engine(v[D.DOCKER_HOST] or None) as engine:
        scheduler = await scheduler_for(engine, app, config.scheduler, v)
        yield Deployer(store, prefix, engine, scheduler, settings, say)


async def run(command: str, v: Values, store: Store, prefix: str) -> int:
    app = v[D.APP]
    if command == "scale":  # kept in the config once it runs (a failed scale-up keeps none)
        code = await scale(v, store, prefix, app, v[D.COUNT])
        await apps.edit(store, prefix, app, {"replicas": v[D.COUNT]})
        return code
    if command == "logs":
        return await logs.command(v, store, prefix, app)
    if command == "run":
        return await run_command(v, store, prefix, app)
    config = (await apps.load(store, prefix, app)).config
    async with deployer(v, store, prefix, app, config) as d:
        await d.retire(app, v[D.DEPLOY_ID])
    return EXIT_OK


# -- scale ----------------------------------------------------------------------------


async def scale(v: Values, store: Store, prefix: str, app: str, count: int) -> int:
    """The active release to `count` instances now: new ones gated on health like a
    deploy's (a failure removes them); surplus ones drained at every edge, then stopped
    and removed."""
    config = (await apps.load(store, prefix, app)).config
    async with deployer(v, store, prefix, app, config) as d:
        current = await d.active_release(app, config)
        if current is None:
            say(f"{app}: no release runs yet; the first deploy starts {count}")
            return EXIT_OK
        config = current.config(config)
        new = Release(app, current.version, current.image, current.id, current.command)
        async with deploy_lock(
            store, prefix, app, f"scale-{current.id}", wait_limit=d.settings.lock_timeout, say=say
        ):
            svc = (await ops.snapshot(store, prefix)).services.get(config.service)
            have = ops.up_count(svc, current.version) if svc else 0
            say(f"{app}: {current.name} ({current.version}) from {have} to {count} instance(s)")

            async def drain(ids: list[str]) -> None:
                await drain_containers(store, prefix, config, ids, d.settings.wait_timeout)

            started = await d.scheduler.scale(new, config, count, drain)
            if started:
                wanted = AppConfig.from_dict({**config.to_dict(), "replicas": count})
                try:
                    await d.gate.wait(new, wanted, started)
                except BaseException:  # the new ones go; the others serve on
                    if isinstance(d.scheduler, LocalScheduler):
                        await d.scheduler.remove_ids(started)
                    else:  # a service's replicas: back to what they were
                        await d.scheduler.scale(new, config, max(have, 1), drain)
                    raise
            say(f"{app}: {count} instance(s) of {current.name}")
    return EXIT_OK


async def drain_containers(
    store: Store, prefix: str, config: AppConfig, ids: list[str], within: float
) -> None:
    """Mark the containers' instance records draining, wait for every edge to apply it,
    then for the app's drain period (in-flight requests finish)."""
    _, kvs = await store.get_prefix(keys.instances_prefix(prefix, config.service))
    revision = 0
    for kv in kvs:
        name = kv.key.rpartition("/")[2]
        if not any(name.endswith(short(cid)) for cid in ids):
            continue
        with contextlib.suppress(RecordError):
            if Instance.parse(kv.value).state == "draining":
                continue
        with contextlib.suppress(ops.Refused):
            revision = max(revision, await ops.drain(store, prefix, config.service, name))
            say(f"  {name}: draining")
    if revision:
        await release.wait_for_edges(store, prefix, revision, within=within, say=say)
    await asyncio.sleep(config.drain_seconds)  # the drain period, not synchronisation


# -- run ------------------------------------------------------------------------------


async def run_command(v: Values, store: Store, prefix: str, app: str) -> int:
    """`fluster run APP -- CMD`: a one-off container of the active release (image, env,
    limits, volumes, network), stdin and tty attached when there are some, removed after.
    It is `docker run` in the end, on this terminal: its exit status, signals and
    terminal are the command's own."""
    given: list[str] = v[D.RUN_COMMAND]
    argv = list(given)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        say("fluster: give the command after --, e.g. fluster run web -- python manage.py shell")
        return EXIT_USAGE
    config = (await apps.load(store, prefix, app)).config
    network = v[D.NETWORK]
    async with deployer(v, store, prefix, app, config) as d:
        current = await d.active_release(app, config)
        if current is not None and not network and config.scheduler == "local":
            network = (await placement(d.engine, app))[1]
    if current is None:
        raise DeployFailed(f"{app} has no release yet: nothing to run")
    config = current.config(config)
    docker = shutil.which("docker")
    if docker is None:
        raise DeployError("`fluster run` needs the docker command on this host")
    env = oneoff.environment(app, current.version, config)
    args = [docker, "run", "--rm", "--label", f"{oneoff.ONEOFF_LABEL}={app}"]
    args += ["-i"] if not sys.stdin.isatty() or sys.stdout.isatty() else []
    args += ["-t"] if sys.stdin.isatty() and sys.stdout.isatty() else []
    if network:
        args += ["--network", network]
    if config.memory:
        args += ["--memory", config.memory]
    if config.cpus:
        args += ["--cpus", f"{config.cpus:g}"]
    for mount in oneoff.mounts(app, config):
        ro = ",readonly" if mount["ReadOnly"] else ""
        args += ["--mount", f"type=volume,source={mount['Source']},target={mount['Target']}{ro}"]
    for name in env:  # values from the environment, never on a command line (ps)
        args += ["-e", name]
    args += ["--name", oneoff.name(app, "run"), current.image, *argv]
    child_env = {**os.environ, **env}
    if v[D.DOCKER_HOST]:
        child_env["DOCKER_HOST"] = v[D.DOCKER_HOST]
    sys.stdout.flush()
    proc = await asyncio.create_subprocess_exec(*args, env=child_env)
    return await proc.wait()


# -- a push's retirement, detached -----------------------------------------------------


def retire_later(fluster: list[str], docker_host: str) -> Callable[[str, str], None]:
    """What a push's deploy calls once promoted: `fluster retire APP DEPLOY`, detached
    from the push (its own session, no terminal), with this process's settings."""

    def start(app: str, deploy_id: str) -> None:
        args = [*fluster, "retire", app, deploy_id]
        if docker_host:
            args += ["--docker-host", docker_host]
        subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    return start
