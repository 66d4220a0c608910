"""One-off containers of a release: its `release:` command before traffic, `fluster run`.

A one-off container runs the release's image with the release's environment on the
app's network, like an instance, but it is not one: it carries `fluster.oneoff` instead
of the labels the sidekick registers, so it never takes traffic, and the schedulers,
which find instances by `fluster.app`, never count it. The `Procfile` at the root of a
pushed commit names the commands: `web:` the instances' (else the image's CMD),
`release:` the one run once per release before any new instance starts.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deployer import source
from deployer.engine import DeployError
from deployer.records import AppConfig, memory_bytes

ONEOFF_LABEL = "fluster.oneoff"
MAX_PROCFILE = 16384
LINE_RE = re.compile(r"([A-Za-z0-9_-]+)\s*:\s*(.*)")


@dataclass(frozen=True, slots=True)
class Procfile:
    web: str = ""
    release: str = ""

    @classmethod
    def parse(cls, text: str) -> Procfile:
        """`name: command` lines; blank lines and `#` comments skipped; a line that is
        neither is an error naming it (a typo must not deploy without its migration)."""
        found: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            match = LINE_RE.fullmatch(line.strip())
            if match is None or not match.group(2).strip():
                raise DeployError(f"Procfile line {number}: want `name: command`, got {line!r}")
            found[match.group(1)] = match.group(2).strip()
        return cls(web=found.get("web", ""), release=found.get("release", ""))


async def procfile(git_dir: Path, sha: str) -> Procfile:
    """The commit's Procfile; none is an empty one."""
    try:
        raw = await source.git(git_dir, "cat-file", "blob", f"{sha}:Procfile")
    except DeployError:
        return Procfile()
    if len(raw) > MAX_PROCFILE:
        raise DeployError(f"the Procfile is over {MAX_PROCFILE // 1024} KiB")
    return Procfile.parse(raw.decode(errors="replace"))


def name(app: str, what: str) -> str:
    return f"{app}-{what}-{secrets.token_hex(3)}"


def shell(command: str) -> list[str]:
    """A Procfile command as the container runs it: through /bin/sh, as Heroku does."""
    return ["/bin/sh", "-c", command]


def environment(app: str, version: str, config: AppConfig) -> dict[str, str]:
    """What every container of a release gets: the config's env and secrets, then
    fluster's own (which an app cannot shadow)."""
    return {
        **config.environment,
        "APP_VERSION": version,
        "FLUSTER_APP": app,
        "FLUSTER_VERSION": version,
        "PORT": str(config.port),
    }


def limits(app: str, config: AppConfig) -> dict[str, Any]:
    """HostConfig's memory, CPU and volume fields for the config's limits. A volume
    `data:/var/lib/app` is the Docker volume `{app}-data`: apps never share one."""
    out: dict[str, Any] = {}
    if config.memory:
        out["Memory"] = memory_bytes(config.memory)
    if config.cpus:
        out["NanoCpus"] = int(config.cpus * 1e9)
    if config.volumes:
        out["Mounts"] = mounts(app, config)
    return out


def mounts(app: str, config: AppConfig) -> list[dict[str, Any]]:
    out = []
    for volume in config.volumes:
        vname, path, *ro = volume.split(":")
        out.append(
            {"Type": "volume", "Source": f"{app}-{vname}", "Target": path, "ReadOnly": bool(ro)}
        )
    return out


def container_config(release: Any, config: AppConfig, command: str, network: str) -> dict[str, Any]:
    """A one-off container of `release` (a scheduler.Release) running `command`."""
    return {
        "Image": release.image,
        "Cmd": shell(command),
        "Env": [f"{k}={v}" for k, v in environment(release.app, release.version, config).items()],
        "Labels": {ONEOFF_LABEL: release.app, "fluster.version": release.version},
        "HostConfig": {
            **limits(release.app, config),
            **({"NetworkMode": network} if network else {}),
        },
    }
