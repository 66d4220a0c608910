"""The forced command of the deploy user's ssh keys: `git push` to an app, nothing else.

In `authorized_keys`:

    command="fluster git-shell --repos /var/lib/fluster/repos",restrict ssh-ed25519 AAAA...

sshd runs it for every connection with that key, whatever the client asked for, and
passes the request in SSH_ORIGINAL_COMMAND. Only `git-receive-pack` of an existing app
repository under the repos directory is let through; a shell, a fetch, a path outside
the directory or an app that was never created is refused with one line on stderr.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from deployer.records import validate_app_name
from fluster.records import RecordError


class Refused(Exception):
    pass


def allowed(command: str, repos: Path) -> Path:
    """The repository a push may go to, from SSH_ORIGINAL_COMMAND; raises Refused."""
    try:
        words = shlex.split(command)
    except ValueError:
        raise Refused("unreadable command") from None
    if words[:1] == ["git"] and len(words) > 1:
        words = [f"git-{words[1]}", *words[2:]]
    if len(words) != 2 or words[0] != "git-receive-pack":
        raise Refused("only `git push` to an app repository is allowed with this key")
    path = words[1]
    name = path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    parent = path.rstrip("/").rpartition("/")[0]
    if parent not in ("", str(repos).rstrip("/")):
        raise Refused(f"{path}: not an app repository")
    try:
        validate_app_name(name)
    except RecordError:
        raise Refused(f"{path}: not an app repository") from None
    repo = repos / f"{name}.git"
    if not (repo / "HEAD").is_file() or not (repo / "hooks" / "pre-receive").is_file():
        raise Refused(f"no app {name!r} on this deploy host (fluster app create {name})")
    return repo


def main(repos: str | Path, environ: Mapping[str, str]) -> int:
    command = environ.get("SSH_ORIGINAL_COMMAND", "")
    try:
        repo = allowed(command, Path(repos))
    except Refused as exc:
        print(f"fluster: refused: {exc}", file=sys.stderr)
        return 1
    os.execvp("git", ["git", "receive-pack", str(repo)])
    return 1  # not reached: exec replaced this process
