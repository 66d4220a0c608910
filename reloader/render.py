"""Model -> haproxy.cfg text through Jinja2: sandboxed, strict, deterministic.

The environment is sandboxed because `--templates` lets an operator point us at any
directory, and StrictUndefined because a typo in a template must fail the render (and be
rejected like an invalid config) rather than print an empty string into haproxy.cfg.
A user directory overrides the defaults file by file, so overriding `backends.j2`
alone is enough to change backends.

Rendering is pure: `Renderer.render(snapshot, settings)` reads nothing but its
arguments and the templates loaded at construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from fluster.catalog import Snapshot
from reloader.model import (
    Model,
    ModelError,
    RenderSettings,
    build_model,
    format_bind,
    host_header,
)
from reloader.targets import HostFacts

DEFAULT_TEMPLATES = Path(__file__).resolve().parent / "templates"
MAIN_TEMPLATE = "haproxy.cfg.j2"


class RenderError(Exception):
    """The templates could not produce a config (syntax error, undefined name, ...)."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """A config and its routes map, and the model they were rendered from.

    `known` is False for a config this process did not render (a previous run's file):
    its model is unknown, so the next apply reloads rather than plan runtime changes.
    """

    text: str
    model: Model
    routes: str = ""
    known: bool = True


def _bind(address: tuple[str, int]) -> str:
    return format_bind(*address)


class Renderer:
    def __init__(self, templates: Path | None = None) -> None:
        dirs = [str(templates)] if templates else []
        dirs.append(str(DEFAULT_TEMPLATES))
        self.env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader(dirs),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        self.env.globals["bind"] = _bind
        self.env.filters["host_header"] = host_header
        try:
            self.template = self.env.get_template(MAIN_TEMPLATE)
        except jinja2.TemplateError as exc:
            raise RenderError(f"templates: {exc}") from exc

    def text(self, model: Model) -> str:
        try:
            return self.template.render(
                settings=model.settings,
                http_routes=model.http_routes,
                tcp_routes=model.tcp_routes,
                backends=model.backends,
                https_bind=model.https_bind,
            )
        except (jinja2.TemplateError, ModelError, TypeError, ValueError) as exc:
            raise RenderError(f"{type(exc).__name__}: {exc}") from exc

    def render(
        self,
        snapshot: Snapshot,
        settings: RenderSettings,
        facts: HostFacts | None = None,
        *,
        tls: bool = False,
    ) -> Rendered:
        return self.render_model(build_model(snapshot, settings, facts, tls=tls))

    def render_model(self, model: Model) -> Rendered:
        try:
            routes = model.routes_text()
        except ModelError as exc:
            raise RenderError(f"routes map: {exc}") from exc
        return Rendered(self.text(model), model, routes)


def render(snapshot: Snapshot, settings: RenderSettings, templates: Path | None = None) -> str:
    """The config text for `snapshot` (convenience for one-off renders and tests)."""
    return Renderer(templates).render(snapshot, settings).text
