"""The Docker Engine API, as much of it as a deploy needs, through aiodocker.

Every aiodocker or aiohttp error becomes a `DeployError` here, at the call site, with the
engine's own words: a build that fails says which step and why, a push that fails says
what the registry answered. Streams (build, push, pull) are relayed line by line to
`out`, so a user watching `git push` sees the build as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from typing import Any, Literal

import aiodocker
import aiohttp
from aiodocker.jsonstream import json_stream_stream

from fluster.text import printable


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
        raise DeployError(printable(str(item.get("error", "")), keep_newlines=True).strip())
    text = str(item.get("stream") or "").rstrip("\n")
    if not text and item.get("status") and "progress" not in item:
        text = " ".join(str(item[k]) for k in ("id", "status") if item.get(k))
    for line in printable(text, keep_newlines=True).splitlines():
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

    async def build(
        self,
        context: AsyncIterable[bytes],
        tag: str,
        labels: Mapping[str, str],
        out: Out,
        *,
        network: str = "none",
        time_limit: float | None = None,
    ) -> str:
        """Build from a tar context streamed to the engine (never held in memory here),
        its RUN steps on `network` ("none": no network at all), for at most `time_limit`
        seconds; returns the image id. The engine is asked never to pull, though the
        classic builder still pulls a FROM image that is missing: callers check first.

        Past the timeout the request is dropped, and the engine cancels the build and
        removes its step's container (forcerm)."""
        last: list[str] = []
        params = {
            "t": tag,
            "labels": json.dumps(dict(labels)),
            "rm": "1",
            "forcerm": "1",
            "pull": "0",
            "networkmode": network,
        }
        try:
            request = self.client._query_chunked_post(
                "build",
                "POST",
                params=params,
                data=context,
                headers={"Content-Type": "application/x-tar"},
                timeout=None,
            )
            async with asyncio.timeout(time_limit), _mapped("build"), request as response:
                async for item in json_stream_stream(response, raise_on_error=False):
                    _say_stream(item, out, last)
        except TimeoutError:
            raise DeployError(
                f"build stopped: it ran past the build time limit ({time_limit:g}s)"
            ) from None
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

    async def image_names(self, ref: str) -> list[str]:
        """Every name the image `ref` resolves to is known by (tags and digests)."""
        async with _mapped(f"image {ref}"):
            info = await self.client.images.inspect(ref)
        return [str(n) for n in (info.get("RepoTags") or []) + (info.get("RepoDigests") or [])]

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
        await self._transfer("push", ref, out)

    async def pull(self, ref: str, out: Out) -> None:
        await self._transfer("pull", ref, out)

    async def _transfer(self, way: Literal["push", "pull"], ref: str, out: Out) -> None:
        repo, _, tag = ref.rpartition(":")
        last: list[str] = []
        move = self.client.images.push if way == "push" else self.client.images.pull
        async with _mapped(f"{way} {ref}"):
            async for item in move(repo, tag=tag, stream=True):
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
        return printable("".join(chunks), keep_newlines=True).splitlines()[-lines:]
