"""Deploy keys: which ssh keys may push which apps, kept in sshd's `authorized_keys`.

Each key `fluster app keys add` writes is one line whose forced command names the key
and the apps it may push:

    command="fluster git-shell --repos /var/lib/fluster/repos --key alice --apps web,api",
    restrict ssh-ed25519 AAAA... fluster:alice          (one line in the file)

sshd runs that command whatever the client asked for, so the line is the whole grant:
`fluster git-shell` lets the key push only those apps (and so see only their refs), and
the push's deploy records the key's name as who deployed. Lines fluster did not write
are left as they are. The file is rewritten whole (a temporary file renamed over it),
mode 600.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deployer.records import validate_app_name
from fluster.records import RecordError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
LINE_RE = re.compile(r'command="(?P<command>[^"]*)",restrict (?P<type>\S+) (?P<blob>\S+)(?: .*)?')


class KeyProblem(Exception):
    """A key cannot be added or removed as asked; the message says why."""


@dataclass(frozen=True, slots=True)
class DeployKey:
    name: str
    apps: tuple[str, ...]
    key_type: str
    blob: str
    repos: str = ""  # as the line has it

    @property
    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def line(self, fluster: Sequence[str], repos: str) -> str:
        apps = ",".join(self.apps)
        command = shlex.join(
            [*fluster, "git-shell", "--repos", repos, "--key", self.name, "--apps", apps]
        )
        return f'command="{command}",restrict {self.key_type} {self.blob} fluster:{self.name}'


def parse_public_key(text: str) -> tuple[str, str]:
    """(type, base64 blob) of one OpenSSH public key line; KeyProblem if it is not one."""
    words = text.strip().split()
    if len(words) < 2 or words[0] not in KEY_TYPES:
        raise KeyProblem(
            "not an OpenSSH public key (want a line like `ssh-ed25519 AAAA... comment`, "
            "as in id_ed25519.pub)"
        )
    key_type, blob = words[0], words[1]
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise KeyProblem("the public key's base64 does not decode") from None
    name = key_type.encode()
    if raw[:4] != len(name).to_bytes(4, "big") or raw[4 : 4 + len(name)] != name:
        raise KeyProblem(f"the public key's data is not a {key_type} key")
    return key_type, blob


def parse_line(line: str) -> DeployKey | None:
    """The deploy key a line of authorized_keys grants, if fluster wrote it."""
    match = LINE_RE.fullmatch(line.strip())
    if not match:
        return None
    try:
        words = shlex.split(match["command"])
    except ValueError:
        return None
    if "git-shell" not in words or "--key" not in words or "--apps" not in words:
        return None
    try:
        name = words[words.index("--key") + 1]
        apps = tuple(a for a in words[words.index("--apps") + 1].split(",") if a)
        repos = words[words.index("--repos") + 1] if "--repos" in words else ""
    except IndexError:
        return None
    return DeployKey(name, apps, match["type"], match["blob"], repos)


class KeyFile:
    """An authorized_keys file, read and written whole."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeyProblem(f"cannot read {self.path}: {exc.strerror}") from None

    def granted(self) -> list[DeployKey]:
        return [k for k in map(parse_line, self.lines()) if k is not None]

    def write(self, lines: list[str]) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".authorized_keys.")
            with os.fdopen(fd, "w") as out:
                out.write("".join(f"{line}\n" for line in lines))
            os.chmod(tmp, 0o600)
            if self.path.exists():
                st = self.path.stat()
                os.chown(tmp, st.st_uid, st.st_gid)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise KeyProblem(f"cannot write {self.path}: {exc.strerror}") from None

    def add(
        self, app: str, name: str, public_key: str, fluster: Sequence[str], repos: str
    ) -> DeployKey:
        """Let key `name` push `app`: a new line, or `app` added to the key's line."""
        if not NAME_RE.fullmatch(name):
            raise KeyProblem(f"key name {name!r}: want 1 to 64 of [A-Za-z0-9_.@-]")
        key_type, blob = parse_public_key(public_key)
        lines, out, done = self.lines(), [], None
        for line in lines:
            key = parse_line(line)
            if key is None or (key.name != name and key.blob != blob):
                out.append(line)
                continue
            if key.blob != blob:
                raise KeyProblem(f"a different public key is already named {name}")
            if key.name != name:
                raise KeyProblem(f"this public key is already deploy key {key.name}")
            apps = key.apps if app in key.apps else (*key.apps, app)
            done = DeployKey(name, apps, key_type, blob, key.repos or repos)
            out.append(done.line(fluster, done.repos))
        if done is None:
            done = DeployKey(name, (app,), key_type, blob)
            out.append(done.line(fluster, repos))
        self.write(out)
        return done

    def remove(self, app: str, name: str) -> DeployKey:
        """Key `name` may no longer push `app` (its line goes with its last app)."""
        out, found = [], None
        for line in self.lines():
            key = parse_line(line)
            if key is None or key.name != name or app not in key.apps:
                out.append(line)
                continue
            found = key
            rest = tuple(a for a in key.apps if a != app)
            if rest:
                command = LINE_RE.fullmatch(line.strip())
                assert command is not None
                words = shlex.split(command["command"])
                words[words.index("--apps") + 1] = ",".join(rest)
                out.append(
                    f'command="{shlex.join(words)}",restrict {key.key_type} {key.blob} '
                    f"fluster:{name}"
                )
        if found is None:
            raise KeyProblem(f"no deploy key {name} for {app} in {self.path}")
        self.write(out)
        return found


def main(action: str, app: str, name: str, key_file: str, path: Path, fluster: Sequence[str],
         repos: str) -> int:  # fmt: skip
    """`fluster app keys add|ls|rm APP`; 0 done, 1 failed, 2 bad input."""
    try:
        validate_app_name(app)
        keys = KeyFile(path)
        if action == "ls":
            mine = [k for k in keys.granted() if app in k.apps]
            for k in mine:
                print(f"{k.name}  {k.key_type}  {k.fingerprint}  apps: {','.join(k.apps)}")
            if not mine:
                print(f"no deploy keys for {app} in {path} (fluster app keys add {app} ...)")
            return 0
        if not name:
            raise KeyProblem("give the key a name: --name NAME (who it belongs to)")
        if action == "rm":
            gone = keys.remove(app, name)
            print(f"{app}: deploy key {gone.name} removed ({gone.fingerprint})")
            return 0
        if not key_file:
            raise KeyProblem("give the public key: --key FILE (or --key - to read it from stdin)")
        try:
            text = sys.stdin.read() if key_file == "-" else Path(key_file).read_text()
        except OSError as exc:
            raise KeyProblem(f"cannot read {key_file}: {exc.strerror}") from None
        added = keys.add(app, name, text, fluster, repos)
        print(
            f"{app}: deploy key {added.name} ({added.fingerprint}) may push "
            f"{', '.join(added.apps)}; written to {path}"
        )
        return 0
    except RecordError as exc:
        print(f"fluster: invalid value: {exc}", file=sys.stderr)
        return 2
    except KeyProblem as exc:
        print(f"fluster: {exc}", file=sys.stderr)
        return 1
