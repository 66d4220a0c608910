"""The Docker Engine API, as much of it as a deploy needs, through aiodocker.

Every aiodocker or aiohttp error becomes a `DeployError` here, at the call site, with the
engine's own words: a build that fails says which step and why, a push that fails says
what the registry answered. Streams (build, push, pull) are relayed line by line to
`out`, so a user watching `git push` sees the build as it happens.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiodocker
import aiohttp


class DeployError(Exception):
    """A deploy step failed; the message is for the user (and the deploy record)."""


class NotFound(DeployError):
    """No such container or image."""


Out = Callable[[str], None]


@contextlib.asynccontextmanager
async def _mapped(what: str) -> AsyncIterator[None]:
    try:
        yield
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            raise NotFound(f"{what}: {exc.message}") from None
        raise DeployError(f"{what}: {exc.message}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise DeployError(f"{what}: Docker engine unreachable ({exc!r})") from None


def _say_stream(item: Mapping[str, Any], out: Out, last: list[str]) -> None:
    """Relay one line of a build/push/pull stream; progress bars are left out."""
    if "error" in item:
        raise DeployError(str(item.get("error", "")).strip())
    text = str(item.get("stream") or "").rstrip("\n")
    if not text and item.get("status") and "progress" not in item:
        text = " ".join(str(item[k]) for k in ("id", "status") if item.get(k))
    for line in text.splitlines():
        if line.strip():
            out(line)
            last.append(line)
            del last[:-20]


class Engine:
    """One Docker engine (`url`: None for DOCKER_HOST or the local socket)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url
        self._client: aiodocker.Docker | None = None

    @property
    def client(self) -> aiodocker.Docker:
        if self._client is None:
            self._client = aiodocker.Docker(url=self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- images -------------------------------------------------------------------------

    async def build(self, context: bytes, tag: str, labels: Mapping[str, str], out: Out) -> str:
        """Build a tar context (never pulling the base image); returns the image id."""
        last: list[str] = []
        try:
            async with _mapped("build"):
                stream = self.client.images.build(
                    fileobj=io.BytesIO(context),
                    encoding="identity",
                    tag=tag,
                    labels=dict(labels),
                    rm=True,
                    forcerm=True,
                    pull=False,
                    stream=True,
                )
                async for item in stream:
                    _say_stream(item, out, last)
        except DeployError as exc:
            tail = "\n".join(last[-10:])
            raise DeployError(f"build failed: {exc}" + (f"\n{tail}" if tail else "")) from None
        return await self.image_id(tag)

    async def image_id(self, ref: str) -> str:
        async with _mapped(f"image {ref}"):
            info = await self.client.images.inspect(ref)
        return str(info["Id"])

    async def image_labels(self, ref: str) -> dict[str, str]:
        async with _mapped(f"image {ref}"):
            info = await self.client.images.inspect(ref)
        return dict((info.get("Config") or {}).get("Labels") or {})

    async def has_image(self, ref: str) -> bool:
        try:
            await self.image_id(ref)
        except NotFound:
            return False
        return True

    async def tag(self, source: str, target: str) -> None:
        repo, _, tag = target.rpartition(":")
        async with _mapped(f"tag {target}"):
            await self.client.images.tag(source, repo, tag=tag)

    async def push(self, ref: str, out: Out) -> None:
        repo, _, tag = ref.rpartition(":")
        last: list[str] = []
        async with _mapped(f"push {ref}"):
            async for item in self.client.images.push(repo, tag=tag, stream=True):
                _say_stream(item, out, last)

    async def pull(self, ref: str, out: Out) -> None:
        repo, _, tag = ref.rpartition(":")
        last: list[str] = []
        async with _mapped(f"pull {ref}"):
            async for item in self.client.images.pull(repo, tag=tag, stream=True):
                _say_stream(item, out, last)

    # -- containers ---------------------------------------------------------------------

    async def containers(self, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """Every container (running or not) carrying all of `labels`, as `docker ps -a`."""
        filters = json.dumps({"label": [f"{k}={v}" for k, v in labels.items()]})
        async with _mapped("list containers"):
            found = await self.client._query_json(
                "containers/json", params={"all": "1", "filters": filters}
            )
        return [dict(c) for c in found]

    async def inspect(self, ref: str) -> dict[str, Any]:
        async with _mapped(f"container {ref[:12]}"):
            container = await self.client.containers.get(ref)
        return dict(container._container)

    async def create(self, name: str, config: Mapping[str, Any]) -> str:
        async with _mapped(f"create {name}"):
            container = await self.client.containers.create(dict(config), name=name)
        return str(container.id)

    async def start(self, ref: str) -> None:
        async with _mapped(f"start {ref[:12]}"):
            await self.client.containers.container(ref).start()

    async def stop(self, ref: str, grace: int = 10) -> None:
        async with _mapped(f"stop {ref[:12]}"):
            await self.client.containers.container(ref).stop(t=grace)

    async def remove(self, ref: str) -> None:
        with contextlib.suppress(NotFound):
            async with _mapped(f"remove {ref[:12]}"):
                await self.client.containers.container(ref).delete(force=True, v=True)

    async def logs(self, ref: str, lines: int = 20) -> list[str]:
        async with _mapped(f"logs {ref[:12]}"):
            chunks = await self.client.containers.container(ref).log(
                stdout=True, stderr=True, tail=lines
            )
        return "".join(chunks).splitlines()[-lines:]
