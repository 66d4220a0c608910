"""Git on the deploy host: the bare repository per app, its hook, and the pushed tree.

A push lands in `{repos}/{app}.git`. Its `pre-receive` hook is a thin call of
`fluster deploy APP --git DIR --receive`, so a deploy that fails (build, health gate)
rejects the push: the branch on the server keeps pointing at what is running, and
`git push` exits non-zero with the reason in its `remote:` lines. The build context is
`git archive` of the pushed commit, never anyone's working copy. During pre-receive the
pushed objects sit in git's quarantine directory; git passes its location to the hook
in the environment, which the git commands here inherit.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deployer.engine import DeployError
from fluster.text import printable

ZERO = "0" * 40
CHUNK = 256 * 1024  # of the build context, read from git and sent to the engine
MAX_DOCKERFILE = 256 * 1024
SHA_RE = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
HOOK_MARK = "# fluster deploy hook"


@dataclass(frozen=True, slots=True)
class Commit:
    sha: str
    subject: str
    author: str

    @property
    def version(self) -> str:
        """The version every container, record and image tag of this commit carries."""
        return self.sha[:12]


GIT = shutil.which("git") or "/usr/bin/git"


async def git(git_dir: Path, *args: str) -> bytes:
    """Run one git command against `git_dir`; its error output becomes a DeployError.

    From a thread with posix_spawn (an absolute path, close_fds=False): a fork() in a
    process with gRPC's threads makes gRPC print warnings into the user's `git push`.
    """
    try:
        proc = await asyncio.to_thread(
            subprocess.run,
            [GIT, f"--git-dir={git_dir}", *args],
            capture_output=True,
            close_fds=False,
            check=False,
        )
    except OSError as exc:
        raise DeployError(f"cannot run git: {exc}") from None
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}"
        raise DeployError(f"git {args[0]}: {message}")
    return proc.stdout


def git_dir_of(path: Path) -> Path:
    """A bare repository is its own git dir; a working tree keeps it in `.git`."""
    return path / ".git" if (path / ".git").exists() else path


async def resolve(git_dir: Path, ref: str) -> Commit:
    """The commit `ref` names (branch, tag or sha), with its subject and author."""
    if ref.startswith("-"):
        raise DeployError(f"not a git ref: {ref!r}")
    sha = (await git(git_dir, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")).decode()
    sha = sha.strip()
    if not SHA_RE.fullmatch(sha):
        raise DeployError(f"no commit {ref!r} in {git_dir}")
    info = (await git(git_dir, "log", "-1", "--format=%an <%ae>%n%s", sha)).decode()
    author, _, subject = printable(info, keep_newlines=True).partition("\n")
    return Commit(sha, subject.strip(), author.strip())


def tar_size(sizes: Iterable[int]) -> int:
    """What `git archive --format=tar` of files of these sizes comes to, about: a
    512-byte header per entry, contents padded to 512, two zero blocks at the end."""
    return sum(512 + -(-size // 512) * 512 for size in sizes) + 1024


async def context_size(git_dir: Path, commit: Commit) -> int:
    """The size of the commit's build context, from git's index of it (nothing is
    unpacked): a tree too big is refused before a byte of it is read."""
    listing = await git(git_dir, "ls-tree", "-r", "-l", "-z", "--full-tree", commit.sha)
    sizes = []
    for entry in listing.split(b"\0"):
        meta = entry.partition(b"\t")[0].split()
        if len(meta) == 4:
            sizes.append(int(meta[3]) if meta[3].isdigit() else 0)
    return tar_size(sizes)


async def archive(git_dir: Path, commit: Commit, limit: int) -> AsyncIterator[bytes]:
    """The commit's tree as an uncompressed tar (the build context), in chunks as
    `git archive` writes them; more than `limit` bytes is an error, whatever the
    listing said. The git process goes with the iterator, finished or not."""
    proc = await asyncio.create_subprocess_exec(
        GIT,
        f"--git-dir={git_dir}",
        # Blobs over this are streamed, not read whole into git's memory (default 512m).
        "-c",
        "core.bigFileThreshold=16m",
        "archive",
        "--format=tar",
        commit.sha,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        close_fds=False,  # posix_spawn, no fork(): see git() above
    )
    assert proc.stdout is not None and proc.stderr is not None
    sent = 0
    try:
        while chunk := await proc.stdout.read(CHUNK):
            sent += len(chunk)
            if sent > limit:
                raise DeployError(too_big(limit))
            yield chunk
        error = (await proc.stderr.read()).decode(errors="replace").strip()
        if await proc.wait() != 0:
            raise DeployError(f"git archive: {error or f'exit {proc.returncode}'}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def too_big(limit: int) -> str:
    return (
        f"the build context (the pushed tree) is over the limit of {limit // 2**20} MiB: "
        "keep large files out of the repository, or raise --max-context on the deploy host"
    )


async def dockerfile(git_dir: Path, commit: Commit) -> str:
    """The Dockerfile at the root of the commit's tree."""
    try:
        raw = await git(git_dir, "cat-file", "blob", f"{commit.sha}:Dockerfile")
    except DeployError:
        raise DeployError(
            f"no Dockerfile at the root of {commit.version}: fluster builds the image from it"
        ) from None
    if len(raw) > MAX_DOCKERFILE:
        raise DeployError(f"the Dockerfile is over {MAX_DOCKERFILE // 1024} KiB")
    return raw.decode(errors="replace")


@dataclass(frozen=True, slots=True)
class Update:
    """One line of pre-receive's stdin: a ref the push moves from `old` to `new`."""

    old: str
    new: str
    ref: str


def pushed(lines: Sequence[str], branch: str) -> Update | None:
    """From pre-receive's stdin ("old new ref" lines): the update of the deployed branch,
    or None when the push does not move it (another branch, a tag, a delete)."""
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        old, new, ref = parts
        if ref == f"refs/heads/{branch}" and new != ZERO and SHA_RE.fullmatch(new):
            return Update(old, new, ref)
    return None


async def current(git_dir: Path, ref: str) -> str:
    """What `ref` points at now (ZERO when it does not exist yet)."""
    try:
        return (await git(git_dir, "rev-parse", "--verify", "--quiet", ref)).decode().strip()
    except DeployError:
        return ZERO


# -- the bare repository ----------------------------------------------------------------


def repo_path(repos: Path, app: str) -> Path:
    return repos / f"{app}.git"


def hook_script(app: str, fluster: Sequence[str], env: Mapping[str, str]) -> str:
    """The pre-receive hook: the settings `fluster app create` ran with, then the deploy.

    Secrets are not written here: a hook that needs ETCD_PASSWORD reads it from
    /etc/fluster/deploy.env (root-owned, mode 600) when that file exists.
    """
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
    command = " ".join(shlex.quote(part) for part in fluster)
    return (
        "#!/bin/sh\n"
        f"{HOOK_MARK} (written by `fluster app create {app}`; rewritten by running it again)\n"
        f"{exports}"
        "[ -r /etc/fluster/deploy.env ] && . /etc/fluster/deploy.env\n"
        f'exec {command} deploy {shlex.quote(app)} --git "$(pwd)" --receive\n'
    )


async def create_repo(repos: Path, app: str, branch: str, hook: str) -> tuple[Path, bool]:
    """Make (or keep) the app's bare repository and (re)write its hook; (path, created).

    HEAD names the deployed branch, so a clone of the repository checks it out."""
    path = repo_path(repos, app)
    created = not await asyncio.to_thread((path / "HEAD").exists)
    if created:
        await git(path, "init", "--bare", "--quiet", str(path))
    await git(path, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
    # receive-pack streams blobs over this to disk instead of inflating them in memory.
    await git(path, "config", "core.bigFileThreshold", "16m")
    await asyncio.to_thread(install_hook, path, hook)
    return path, created


def install_hook(path: Path, hook: str) -> None:
    target = path / "hooks" / "pre-receive"
    try:
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_suffix(".new")
        tmp.write_text(hook)
        os.chmod(tmp, 0o755)
        tmp.replace(target)
    except OSError as exc:
        raise DeployError(f"cannot write {target}: {exc}") from None
