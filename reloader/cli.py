"""`reloader` entry point: settings, logging, then run or render once."""

from __future__ import annotations

import asyncio
import sys

from fluster.catalog import Catalog
from fluster.runtime import capture_signals, run, setup_logging
from fluster.settings import SettingsError, exit_on_problems
from fluster.store import Store, StoreError
from reloader import settings as settings_mod
from reloader.app import Reloader
from reloader.render import Renderer, RenderError


async def render_once(settings: settings_mod.Settings, renderer: Renderer) -> int:
    async with Store(settings.etcd) as store:
        snapshot = await Catalog(store, settings.prefix).load()
    sys.stdout.write(renderer.render(snapshot, settings.render).text)
    return 0


async def run_reloader(settings: settings_mod.Settings, renderer: Renderer) -> int:
    stop = asyncio.Event()
    with capture_signals(stop):
        return await Reloader(settings, renderer).run(stop)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = settings_mod.load(argv)
    except SettingsError as exc:
        exit_on_problems(exc)
    setup_logging(settings.log_level)
    try:
        renderer = Renderer(settings.templates)
    except RenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if settings.command == "render":
            return run(render_once(settings, renderer))
        return run(run_reloader(settings, renderer))
    except StoreError as exc:
        print(f"error: etcd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
