"""The image a deploy releases: received (a pushed commit, or an image by name), built
within the deploy host's bounds (its size, time and network, and the images a build may
start from), and checked for labels that only a container may carry."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from deployer import dockerfile, source
from deployer.engine import DeployError, Engine
from fluster.docker import NotFound

if TYPE_CHECKING:
    from deployer.progress import Settings, Source

REVISION_LABEL = "org.opencontainers.image.revision"
IMAGE_ID_RE = re.compile(r"(sha256:)?[0-9a-f]{12,64}")


def repository(name: str) -> str:
    """`host:5000/app:tag` and `host:5000/app@sha256:...` -> `host:5000/app`."""
    name = name.partition("@")[0]
    head, _, tail = name.rpartition("/")
    return f"{head}/{tail.partition(':')[0]}" if head else tail.partition(":")[0]


class Images:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        head: Callable[[str], None],
        detail: Callable[[str], None],
    ) -> None:
        self.engine, self.settings = engine, settings
        self.head, self.detail = head, detail

    async def receive(self, app: str, src: Source) -> tuple[str, str, str, source.Commit | None]:
        """(image name in the registry, ref, version, commit) of what is deployed."""
        registry = self.settings.registry.rstrip("/")
        if src.git_dir is not None:
            commit = await source.resolve(src.git_dir, src.ref)
            return f"{registry}/{app}:{commit.version}", src.ref, commit.version, commit
        if not await self.engine.has_image(src.image):
            self.head(f"pulling {src.image}")
            await self.engine.pull(src.image, self.detail)
        await self.check_labels(src.image)
        labels = await self.engine.image_labels(src.image)
        revision = labels.get(REVISION_LABEL, "")
        if source.SHA_RE.fullmatch(revision):
            version = revision[:12]
        else:
            version = (await self.engine.image_id(src.image)).removeprefix("sha256:")[:12]
        return f"{registry}/{app}:{version}", src.image, version, None

    async def build(self, app: str, git_dir: Path, commit: source.Commit, target: str) -> None:
        """Build the pushed tree, within the deploy host's bounds: its size, its time,
        its network, and the images it may start from."""
        limit = self.settings.max_context
        size = await source.context_size(git_dir, commit)
        if size > limit:
            raise DeployError(source.too_big(limit))
        await self.check_bases(app, await source.dockerfile(git_dir, commit))
        network = self.settings.build_network
        self.detail(
            f"context: git archive {commit.sha[:12]} ({size // 1024} KiB), "
            f"network {network}, at most {self.settings.build_timeout:g}s"
        )
        await self.engine.build(
            source.archive(git_dir, commit, limit),
            target,
            {REVISION_LABEL: commit.sha},
            self.detail,
            network=network,
            time_limit=self.settings.build_timeout,
        )
        await self.check_labels(target)

    async def check_bases(self, app: str, text: str) -> None:
        """Refuse a Dockerfile that builds from an image this app may not use: one that
        is not on the host (a build never pulls), another app's (its files would be
        printed into this push), or one the operator did not allow."""
        registry = self.settings.registry.rstrip("/") + "/"
        own = f"{registry}{app}"
        for ref in dockerfile.images(text):
            where = f"Dockerfile line {ref.line} ({ref.instruction} {ref.image})"
            if IMAGE_ID_RE.fullmatch(ref.image):
                raise DeployError(f"{where}: name the image, not its id")
            try:
                names = await self.engine.image_names(ref.image)
            except NotFound:
                raise DeployError(
                    f"{where}: no such image on this deploy host, and builds never pull; "
                    "the operator loads base images there (docker load, docker build)"
                ) from None
            names = [ref.image, *names]
            if any(repository(n) == own for n in names):
                continue
            others = sorted({repository(n) for n in names if n.startswith(registry)})
            if others:
                raise DeployError(
                    f"{where}: that is app {others[0].removeprefix(registry)}'s image; a build "
                    "may start only from its own app's images and the host's base images"
                )
            allowed = self.settings.base_images
            if allowed and not any(fnmatch.fnmatchcase(n, p) for n in names for p in allowed):
                raise DeployError(
                    f"{where}: not one of the base images this deploy host allows "
                    f"({', '.join(allowed)}; FLUSTER_BASE_IMAGES)"
                )

    async def check_labels(self, image: str) -> None:
        """An image's `fluster.*` labels would be ignored by the sidekick anyway (only
        labels set on a container count): say so now, rather than at the health gate."""
        labels = await self.engine.image_labels(image)
        claimed = sorted(k for k in labels if k.startswith("fluster."))
        if claimed:
            raise DeployError(
                f"the image sets label(s) {', '.join(claimed)} (LABEL in its Dockerfile or "
                "its base image's): fluster sets fluster.* labels on the containers it starts "
                "and never takes them from an image; remove them"
            )
