"""The forced command of the deploy user's ssh keys: `git push` to its own apps, nothing else.

In `authorized_keys`, as `fluster app keys add` writes it (deployer/deploykeys.py):

    command="fluster git-shell --repos /var/lib/fluster/repos --key alice --apps web",
    restrict ssh-ed25519 AAAA...                        (one line in the file)

sshd runs it for every connection with that key, whatever the client asked for, and
passes the request in SSH_ORIGINAL_COMMAND. Only `git-receive-pack` of an existing app
repository under the repos directory, of an app the key names, is let through; a shell,
a fetch, a path outside the directory, another app or an app that was never created is
refused with one line on stderr (another app's refusal does not say whether it exists).
The key's name goes to the push's deploy record as who deployed.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from deployer.records import validate_app_name
from fluster.records import RecordError
from fluster.text import printable


class Refused(Exception):
    pass


KEY_ENV = "FLUSTER_DEPLOY_KEY"  # the pushing key's name, for the deploy record


def allowed(command: str, repos: Path, apps: tuple[str, ...] | None) -> Path:
    """The repository a push may go to, from SSH_ORIGINAL_COMMAND; raises Refused.
    `apps`: those the key may push (None: a line without --key/--apps, refused)."""
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
    if apps is None:
        raise Refused(
            "this ssh key is not a deploy key of any app "
            "(on the deploy host: fluster app keys add APP --name NAME --key FILE)"
        )
    if name not in apps:
        raise Refused(f"this key may not push {name} (it may push: {', '.join(apps) or 'none'})")
    repo = repos / f"{name}.git"
    if not (repo / "HEAD").is_file() or not (repo / "hooks" / "pre-receive").is_file():
        raise Refused(f"no app {name!r} on this deploy host (fluster app create {name})")
    return repo


def main(repos: str | Path, environ: Mapping[str, str], key: str = "", apps: str = "") -> int:
    command = environ.get("SSH_ORIGINAL_COMMAND", "")
    granted = tuple(a for a in apps.split(",") if a) if key else None
    try:
        repo = allowed(command, Path(repos), granted)
    except Refused as exc:
        print(f"fluster: refused: {printable(str(exc))}", file=sys.stderr)
        return 1
    os.execvpe("git", ["git", "receive-pack", str(repo)], {**environ, KEY_ENV: key})
    return 1  # not reached: exec replaced this process
