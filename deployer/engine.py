"""Building and moving images for a deploy, on top of the one Docker wrapper
(fluster/docker.py, which the sidekick uses too: containers, events, errors).

Streams (build, push, pull) are relayed line by line to `out`, so a user watching `git
push` sees the build as it happens; what fails says the engine's own words.
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

from fluster.docker import Docker, DockerError, DockerUnavailable, NotFound
from fluster.text import printable


class DeployError(Exception):
    """A deploy step failed; the message is for the user (and the deploy record)."""


# What fails a deploy step: the deployer's own refusals and the engine's errors.
STEP_ERRORS: tuple[type[Exception], ...] = (DeployError, DockerError)

Out = Callable[[str], None]


def _say_stream(item: Mapping[str, Any], out: Out, last: list[str]) -> None:
    """Relay one line of a build/push/pull stream; progress bars are left out."""
    if "error" in item:
        raise DockerError(printable(str(item.get("error", "")), keep_newlines=True).strip())
    text = str(item.get("stream") or "").rstrip("\n")
    if not text and item.get("status") and "progress" not in item:
        text = " ".join(str(item[k]) for k in ("id", "status") if item.get(k))
    for line in printable(text, keep_newlines=True).splitlines():
        if line.strip():
            out(line)
            last.append(line)
            del last[:-20]


@contextlib.asynccontextmanager
async def mapped(what: str) -> AsyncIterator[None]:
    """Inside: any aiodocker or aiohttp error becomes one of ours, prefixed by `what`."""
    try:
        yield
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            raise NotFound(f"{what}: {exc.message}") from None
        raise DockerError(f"{what}: {exc.message}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise DockerUnavailable(f"{what}: Docker engine unreachable ({exc!r})") from None


class Engine(Docker):
    """One Docker engine, with what a deploy does to images (through aiodocker, which
    the deployer can afford: builds, pushes, pulls, services and their logs)."""

    _client: aiodocker.Docker | None = None

    @property
    def client(self) -> aiodocker.Docker:
        if self._client is None:
            try:
                self._client = aiodocker.Docker(url=self.url)
            except (OSError, ValueError, aiodocker.DockerError) as exc:
                raise DockerUnavailable(f"docker at {self.url}: {exc}") from None
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        await super().close()

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
            async with asyncio.timeout(time_limit), mapped("build"), request as response:
                async for item in json_stream_stream(response, raise_on_error=False):
                    _say_stream(item, out, last)
        except TimeoutError:
            raise DeployError(
                f"build stopped: it ran past the build time limit ({time_limit:g}s)"
            ) from None
        except DockerError as exc:
            tail = "\n".join(last[-10:])
            raise DeployError(f"build failed: {exc}" + (f"\n{tail}" if tail else "")) from None
        return await self.image_id(tag)

    async def image_id(self, ref: str) -> str:
        return str((await self.image(ref))["Id"])

    async def image_names(self, ref: str) -> list[str]:
        """Every name the image `ref` resolves to is known by (tags and digests)."""
        info = await self.image(ref)
        return [str(n) for n in (info.get("RepoTags") or []) + (info.get("RepoDigests") or [])]

    async def tags_of(self, repository: str) -> list[str]:
        """Every `repository:tag` this engine has of `repository`."""
        params = {"filters": json.dumps({"reference": [repository]})}
        found = await self._json("images/json", params=params)
        return sorted(
            str(tag)
            for image in found
            for tag in image.get("RepoTags") or ()
            if tag != "<none>:<none>"
        )

    async def untag(self, ref: str) -> None:
        """Remove the name `ref` (the image goes with its last name, unless a container
        uses it, which Docker refuses: kept then)."""
        with contextlib.suppress(NotFound):
            async with mapped(f"remove image {ref}"):
                await self.client.images.delete(ref, noprune=False)

    async def has_image(self, ref: str) -> bool:
        try:
            await self.image_id(ref)
        except NotFound:
            return False
        return True

    async def tag(self, source: str, target: str) -> None:
        repo, _, tag = target.rpartition(":")
        async with mapped(f"tag {target}"):
            await self.client.images.tag(source, repo, tag=tag)

    async def push(self, ref: str, out: Out) -> None:
        await self._transfer("push", ref, out)

    async def pull(self, ref: str, out: Out) -> None:
        await self._transfer("pull", ref, out)

    async def _transfer(self, way: Literal["push", "pull"], ref: str, out: Out) -> None:
        repo, _, tag = ref.rpartition(":")
        last: list[str] = []
        move = self.client.images.push if way == "push" else self.client.images.pull
        async with mapped(f"{way} {ref}"):
            async for item in move(repo, tag=tag, stream=True):
                _say_stream(item, out, last)

    # -- containers run to completion, and followed output ---------------------------

    async def run_once(
        self, name: str, config: Mapping[str, Any], out: Out, *, time_limit: float
    ) -> int:
        """Create and start a container, relay its output line by line, and return its
        exit status; it is removed whatever happens (a time limit past: killed, 124)."""
        cid = await self.create(name, config)
        try:
            await self.start(cid)
            try:
                async with asyncio.timeout(time_limit):
                    async for line in self.follow(cid):
                        out(line)
                    async with mapped(f"wait {name}"):
                        status = await self.client.containers.container(cid).wait()
            except TimeoutError:
                out(f"(still running after {time_limit:g}s: stopped)")
                return 124
            return int(status.get("StatusCode", 1))
        finally:
            await self.remove(cid)

    async def follow(
        self, ref: str, *, tail: int | str = "all", since: float = 0, follow: bool = True
    ) -> AsyncIterator[str]:
        """A container's output as it comes, line by line, each prefixed by Docker's
        timestamp (RFC 3339, nanoseconds, then a space); safe to print."""
        container = self.client.containers.container(ref)
        options: dict[str, Any] = {"timestamps": True, "tail": str(tail), "since": int(since)}
        async with mapped(f"logs {ref[:12]}"):
            if not follow:
                chunks = await container.log(stdout=True, stderr=True, **options)
                for line in "".join(chunks).splitlines():
                    yield printable(line)
                return
            pending = ""
            async for chunk in container.log(stdout=True, stderr=True, follow=True, **options):
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    yield printable(line)
            if pending:
                yield printable(pending)

    async def service_follow(
        self, name: str, *, tail: int | str = "all", since: float = 0, follow: bool = True
    ) -> AsyncIterator[str]:
        """A Swarm service's output (every task, on every node, through the manager), line
        by line: Docker's timestamp, the task's details (`com.docker.swarm.task.id=...`),
        then the text; safe to print."""
        options: dict[str, Any] = {
            "stdout": True, "stderr": True, "timestamps": True, "details": True,
            "tail": str(tail), "since": int(since),
        }  # fmt: skip
        async with mapped(f"logs of {name}"):
            if not follow:
                got = await self.client.services.logs(name, **options)  # type: ignore[misc]
                for line in "".join(got).splitlines():
                    yield printable(line)
                return
            pending = ""
            async for chunk in self.client.services.logs(name, follow=True, **options):  # type: ignore[union-attr]
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    yield printable(line)
            if pending:
                yield printable(pending)
