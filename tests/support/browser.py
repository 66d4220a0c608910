"""Headless Chromium (Debian's /usr/bin/chromium) for looking at pages as a person would.

No driver library: `--dump-dom` gives the DOM after the page loaded, `--screenshot` a PNG.
Each call runs in a fresh profile directory with everything that would reach the network
on its own turned off, so a test only ever talks to the loopback URL it names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
# Where screenshots are kept for a person to look at after the run.
ARTIFACTS = Path(
    os.environ.get(
        "FLUSTER_TEST_ARTIFACTS", Path(__file__).parents[2] / ".cache" / "test-artifacts"
    )
)


def _run(*args: str, timeout: float = 60.0) -> str:
    with tempfile.TemporaryDirectory(prefix="fluster-chromium-") as profile:
        proc = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        raise AssertionError(f"chromium {args} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc.stdout


def dump_dom(url: str) -> str:
    return _run("--dump-dom", url)


def screenshot(url: str, name: str, size: tuple[int, int] = (1280, 1300)) -> Path:
    """A PNG of `url` kept as ARTIFACTS/name; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)
    _run(f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url)
    assert path.stat().st_size > 10_000, f"{path}: a blank page?"
    return path


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.content: list[Element | str] = []  # text and elements, in document order

    @property
    def text(self) -> str:
        """The element's text with its descendants', whitespace collapsed."""
        return " ".join("".join(self._texts()).split())

    def _texts(self) -> list[str]:
        out: list[str] = []
        for part in self.content:
            out.extend([part] if isinstance(part, str) else part._texts())
        return out

    @property
    def children(self) -> list[Element]:
        return [c for c in self.content if isinstance(c, Element)]

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def find_all(self, cls: str | None = None, tag: str | None = None) -> list[Element]:
        found = []
        for child in self.children:
            if (cls is None or cls in child.classes) and (tag is None or child.tag == tag):
                found.append(child)
            found.extend(child.find_all(cls, tag))
        return found

    def by_id(self, ident: str) -> Element:
        for el in self.find_all():
            if el.attrs.get("id") == ident:
                return el
        raise AssertionError(f"no element with id {ident!r}")


VOID = {"meta", "link", "br", "img", "input", "hr", "col", "source", "wbr"}


class _Tree(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = self.at = Element("#document", {}, None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = Element(tag, {k: v or "" for k, v in attrs}, self.at)
        self.at.content.append(el)
        if tag not in VOID:
            self.at = el

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.at
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.at = node.parent

    def handle_data(self, data: str) -> None:
        self.at.content.append(data)


def parse(html: str) -> Element:
    tree = _Tree()
    tree.feed(html)
    return tree.root
