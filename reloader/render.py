"""Model -> haproxy.cfg text through Jinja2: sandboxed, strict, deterministic.

The environment is sandboxed because `--templates` lets an operator point us at any
directory, and StrictUndefined because a typo in a template must fail the render (and be
rejected like an invalid config) rather than print an empty string into haproxy.cfg.
A user directory overrides the defaults file by file, so overriding `backends.j2`
alone is enough to change backends.

Rendering is pure: `Renderer.render(snapshot, settings)` reads nothing but its
arguments and the templates loaded at construction.

A membership change must not cost a render of the whole config (issue 15: CPU per
change grew with the number of services). `render_model` keeps the last structure's
text as a frame, with one marker server per backend, and fills in the server lines of
the model at hand: string joins, no template. Templates print a server as
`server {{ server.line }}` (see haproxy.cfg.j2), which the marker reveals with its
prefix and suffix; a frame is only used when filling it gives exactly what the
templates render, checked each time a new frame is made, so templates that do more
with servers fall back to a full render.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from fluster.catalog import Snapshot
from reloader.build import build_model
from reloader.model import (
    Model,
    ModelError,
    RenderSettings,
    Route,
    Server,
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
        self._frame: tuple[object, list[str | tuple[int, str, str]] | None] | None = None
        self._blocks: dict[int, tuple[tuple[Server, ...], str]] = {}  # frame slot -> text
        self._routes: tuple[tuple[Route, ...], str] | None = None  # the last routes map
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
        # The map depends on the HTTP routes only; a membership change keeps them (and
        # their objects, so the comparison is cheap): the last text is reused.
        if self._routes is not None and self._routes[0] == model.http_routes:
            routes = self._routes[1]
        else:
            try:
                routes = model.routes_text()
            except ModelError as exc:
                raise RenderError(f"routes map: {exc}") from exc
            self._routes = (model.http_routes, routes)
        return Rendered(self.framed_text(model), model, routes)

    def framed_text(self, model: Model) -> str:
        """`text(model)`, by filling the frame of its structure when there is one."""
        key = model.frame_key()
        if self._frame is not None and self._frame[0] == key:
            parts = self._frame[1]
            return self.text(model) if parts is None else self._fill(parts, model)
        self._blocks.clear()
        text = self.text(model)
        empty = model.without_servers()
        parts = _frame(self.text(_marked(empty)), empty)
        if parts is not None and self._fill(parts, model) != text:
            parts = None  # the templates do more with servers than print their lines
        self._frame = (key, parts)
        return text

    def _fill(self, parts: list[str | tuple[int, str, str]], model: Model) -> str:
        """The frame with each backend's server lines; a backend whose servers are the
        same as last time reuses its block of text."""
        lines: list[str] = []
        for part in parts:
            if isinstance(part, str):
                lines.append(part)
                continue
            index, prefix, suffix = part
            servers = model.backends[index].servers
            kept = self._blocks.get(index)
            if kept is None or kept[0] != servers:
                block = "\n".join(prefix + server.line + suffix for server in servers)
                kept = self._blocks[index] = (servers, block)
            if servers:
                lines.append(kept[1])
        return "\n".join(lines)


def _marker(index: int) -> Server:
    return Server(f"\x00{index}\x00", "", 0, 0)


def _marked(model: Model) -> Model:
    """`model` with one marker server per backend (a name no record can have)."""
    backends = tuple(replace(b, servers=(_marker(i),)) for i, b in enumerate(model.backends))
    return replace(model, backends=backends)


def _frame(text: str, model: Model) -> list[str | tuple[int, str, str]] | None:
    """The marked text as fixed lines and (backend index, prefix, suffix) slots; None
    when a marker is not printed exactly once as a whole server line."""
    parts: list[str | tuple[int, str, str]] = []
    found = 0
    for line in text.split("\n"):
        if "\x00" not in line:
            parts.append(line)
            continue
        index = int(line.split("\x00")[1])
        marker = _marker(index).line
        at = line.find(marker)
        if at < 0 or line.count("\x00") != 2 or index >= len(model.backends):
            return None
        parts.append((index, line[:at], line[at + len(marker) :]))
        found += 1
    return parts if found == len(model.backends) else None


def render(snapshot: Snapshot, settings: RenderSettings, templates: Path | None = None) -> str:
    """The config text for `snapshot` (convenience for one-off renders and tests)."""
    return Renderer(templates).render(snapshot, settings).text
