"""`reloader` entry point: settings, logging, then run or render once."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace

import structlog

from fluster import keys
from fluster.catalog import Catalog
from fluster.runtime import capture_signals, run, setup_logging
from fluster.settings import SettingsError, exit_on_problems, make_directory
from fluster.store import StoreError, open_store
from reloader import settings as settings_mod
from reloader.app import Reloader
from reloader.listener import http_listener
from reloader.model import is_ip
from reloader.render import Renderer, RenderError
from reloader.targets import HostFacts, Resolver

log = structlog.get_logger("reloader")


async def render_once(settings: settings_mod.Settings, renderer: Renderer) -> int:
    async with open_store(settings.etcd) as store:
        snapshot = await Catalog(store, settings.prefix).load()
        _, certs = await store.get_prefix(keys.certs_prefix(settings.prefix))
    # HTTPS is on when a record is there; its validity is the running reloader's concern.
    # Names resolved as the running reloader would; ports are not probed, since a running
    # edge holds its own and would make every TCP service look taken.
    names = {i.host for svc in snapshot.services.values() for i in svc.instances.values()}
    facts = HostFacts(addresses=await Resolver().resolve(n for n in names if not is_ip(n)))
    rendered = renderer.render(snapshot, settings.render, facts, tls=bool(certs))
    sys.stdout.write(rendered.text)
    # The frontend looks routes up in a map file a running reloader writes beside the
    # config; without it the printed config would route nothing, so show it too.
    sys.stdout.write(f"\n# {settings.render.routes_map} (host+path -> backend):\n")
    sys.stdout.writelines(f"#   {line}\n" for line in rendered.routes.splitlines())
    return 0


async def run_reloader(settings: settings_mod.Settings, renderer: Renderer) -> int:
    host, port = settings.render.http_bind
    try:
        listener = http_listener(settings.render)
    except OSError as exc:
        log.error(
            "cannot bind the HTTP frontend", http_bind=f"{host or '*'}:{port}", error=str(exc)
        )
        return 1
    with listener:
        render = replace(settings.render, http_fd=listener.fileno())
        stop = asyncio.Event()
        with capture_signals(stop):
            return await Reloader(replace(settings, render=render), renderer).run(stop)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_mod.load(argv)
    except SettingsError as exc:
        exit_on_problems(exc)
    render = settings.command == "render"
    # `render --once` prints the config on stdout: its logs must never be mixed into it.
    setup_logging(settings.log_level, stream=sys.stderr if render else None)
    problem = None if render else make_directory(settings.render.state_dir, "--state-dir")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        renderer = Renderer(settings.templates)
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if render:
            return run(render_once(settings, renderer))
        return run(run_reloader(settings, renderer))
    except StoreError as exc:
        print(f"error: etcd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
