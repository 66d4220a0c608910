"""Debian's openssh-server on a loopback port, with keys made for the test.

The deploy key is restricted the way docs/DEPLOYING.md tells users to: its
`authorized_keys` line forces `fluster git-shell`, which lets `git push` to an app
repository through and refuses everything else. `git_env` is what a developer's
`git push` runs with: that key, and the server's host key pinned in a known_hosts file.
Its port is written into its config, so it comes from `free_port()`: when sshd's log says
another process took it first, sshd starts again on a fresh one (testbed/ports.py).
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

from testbed.ports import lost_a_port, start_on_fresh_ports
from testbed.process import LogFile, wait_or_kill
from tests.support.etcd import GaveUp, free_port, wait_for

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"

CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_ed25519
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
AllowUsers {user}
PermitRootLogin forced-commands-only
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
LogLevel VERBOSE
"""


def keygen(path: Path) -> str:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path.with_suffix(".pub").read_text().strip()


class Sshd:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.user = getpass.getuser()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = LogFile(root / "sshd.log")  # sshd ends its lines with CR LF
        self._host_pub = ""

    @property
    def authorized_keys(self) -> Path:
        return self.root / "authorized_keys"

    def client_key(self, name: str) -> Path:
        """A client key pair `name` (made once); returns the public key's path."""
        if not (self.root / name).exists():
            keygen(self.root / name)
        return self.root / f"{name}.pub"

    def start(self, forced_command: str | None) -> Sshd:
        """With `forced_command`, the client key's line forces it; with None the file is
        left to `fluster app keys add` (the client key is still made)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._host_pub = keygen(self.root / "host_ed25519")
        client_pub = self.client_key("client_ed25519").read_text().strip()
        lines = f'command="{forced_command}",restrict {client_pub}\n' if forced_command else ""
        self.authorized_keys.write_text(lines)
        return start_on_fresh_ports(
            self._start,
            lambda: lost_a_port(self._log.since_start()),
            self._on_fresh_port,
            f"sshd (log: {self.root}/sshd.log)",
        )

    def _start(self) -> Sshd:
        host_pub = self._host_pub
        (self.root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        config = self.root / "sshd_config"
        config.write_text(CONFIG.format(port=self.port, root=self.root, user=self.user))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        self.proc = self._log.spawn([SSHD, "-D", "-e", "-f", str(config)])
        wait_for(self._up, timeout=20, interval=0.1, what=f"sshd on 127.0.0.1:{self.port}")
        return self

    def _on_fresh_port(self) -> None:
        self.stop()
        self.port = free_port()

    def _up(self) -> bool:
        assert self.proc is not None
        log = self._log.since_start()
        if self.proc.poll() is not None:
            raise GaveUp(f"sshd exited {self.proc.returncode}:\n{log}")
        return "Server listening" in log

    def log(self) -> str:
        return self._log.text()

    def ssh_command(self, key: str = "client_ed25519") -> str:
        return (
            f"ssh -i {self.root}/{key} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o UserKnownHostsFile={self.root}/known_hosts -o StrictHostKeyChecking=yes "
            "-o LogLevel=ERROR"
        )

    def git_env(self, key: str = "client_ed25519") -> dict[str, str]:
        return {**os.environ, "GIT_SSH_COMMAND": self.ssh_command(key)}

    def ssh(self, *command: str, key: str = "client_ed25519") -> subprocess.CompletedProcess[str]:
        """Run `command` over the deploy key, as someone trying for a shell would."""
        return subprocess.run(
            [*self.ssh_command(key).split(), "-p", str(self.port), f"{self.user}@127.0.0.1",
             *command],
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            wait_or_kill(self.proc, 10)
