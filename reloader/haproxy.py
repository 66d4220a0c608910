"""HAProxy as a supervised child: start, watch, restart, reload, stop; and its two CLIs.

The reloader is HAProxy's entrypoint, so it owns the master process: `-Ws` keeps the
master in the foreground (our child), `-S master.sock` gives us the master CLI for
`reload` and `show proc`. A master that dies is started again within a second; a
master that cannot be started at all is a fatal error for the process.

Reloads are judged by the master's own counters in `show proc` ("N [failed: F]") and
the worker pids, never by sleeping: success is a new worker while `failed` stays put.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from fluster.runtime import Backoff

log = structlog.get_logger("reloader.haproxy")

START_TIMEOUT = 10.0
RELOAD_TIMEOUT = 15.0
STOP_GRACE = 10.0
CLI_TIMEOUT = 5.0


class HaproxyError(Exception):
    """HAProxy refused, failed, or could not be reached."""


class StartFailed(HaproxyError):
    pass


class ReloadFailed(HaproxyError):
    pass


class _MasterGone(HaproxyError):
    """The master being reloaded died (supervise() starts another)."""


async def cli(socket: Path, command: str, limit: float = CLI_TIMEOUT) -> str:
    """Send one command over a CLI socket (stats or master) and return the reply."""
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_unix_connection(str(socket))
            try:
                writer.write(command.encode() + b"\n")
                await writer.drain()
                # The master CLI waits for more input until our side is closed.
                if writer.can_write_eof():
                    writer.write_eof()
                data = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError) as exc:
        raise HaproxyError(f"{socket.name}: {command.split()[0]}: {exc!r}") from exc
    return data.decode("utf-8", "replace")


class CliSession:
    """One interactive (`prompt` mode) connection to the stats socket: a batch of runtime
    changes costs one round trip (`exchange`), not a connection or a round trip per
    command. `open()` / `close()`, or `async with`. The runtime API keeps one across
    batches (reloader/runtime_api.py says when it lets it go)."""

    PROMPT = b"\n> "
    SLICE = 100  # commands per write in `exchange`

    def __init__(self, socket: Path, limit: float = CLI_TIMEOUT) -> None:
        self.socket = socket
        self.limit = limit
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> CliSession:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def usable(self) -> bool:
        """Open, and HAProxy has not closed its side (`stats timeout`, a dying worker)."""
        return (
            self._reader is not None
            and self._writer is not None
            and not self._reader.at_eof()
            and not self._writer.is_closing()
        )

    async def open(self) -> CliSession:
        try:
            async with asyncio.timeout(self.limit):
                self._reader, self._writer = await asyncio.open_unix_connection(
                    str(self.socket), limit=1 << 20
                )
        except (OSError, TimeoutError) as exc:
            raise HaproxyError(f"{self.socket.name}: {exc!r}") from exc
        await self.send("prompt")
        return self

    def abort(self) -> None:
        """Close at once (no waiting: for a connection given up on)."""
        if self._writer is not None:
            self._writer.transport.abort()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def send(self, command: str) -> str:
        """The reply to `command`, without the prompt."""
        return (await self.exchange([command]))[0]

    async def exchange(self, commands: Sequence[str]) -> list[str]:
        """The replies to `commands`, sent in one write (HAProxy runs them in order, one
        reply and prompt each): a batch costs one round trip, not one per command."""
        assert self._reader is not None and self._writer is not None
        replies: list[str] = []
        try:
            async with asyncio.timeout(self.limit):
                # In slices, so that neither side's socket buffer fills while the other
                # is still writing.
                for start in range(0, len(commands), self.SLICE):
                    part = commands[start : start + self.SLICE]
                    self._writer.write("".join(c + "\n" for c in part).encode())
                    await self._writer.drain()
                    for _ in part:
                        data = await self._reader.readuntil(self.PROMPT)
                        reply = data[: -len(self.PROMPT)].decode("utf-8", "replace")
                        replies.append(reply + "\n")
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            command = commands[len(replies)].split()[0]
            raise HaproxyError(f"{self.socket.name}: {command}: {exc!r}") from exc
        return replies


@dataclass(frozen=True, slots=True)
class Processes:
    """What `show proc` says: the master's reload counters and current worker pids."""

    reloads: int
    failed: int
    workers: tuple[int, ...]


_MASTER = re.compile(r"^\d+\s+master\s+(\d+)\s+\[failed:\s*(\d+)\]", re.M)


def parse_show_proc(text: str) -> Processes:
    match = _MASTER.search(text)
    if match is None:
        raise HaproxyError(f"unexpected show proc reply: {text[:200]!r}")
    workers: list[int] = []
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line
            continue
        fields = line.split()
        if section == "# workers" and len(fields) > 1 and fields[1] == "worker":
            workers.append(int(fields[0]))
    return Processes(int(match[1]), int(match[2]), tuple(workers))


async def check_config(haproxy: str, path: Path, pass_fds: Sequence[int] = ()) -> str | None:
    """`haproxy -c -f path`: None when valid, else the error text (exit code decides).
    `pass_fds`: the sockets the config binds as `fd@N` (HAProxy checks they are open)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            haproxy,
            "-c",
            "-f",
            str(path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            pass_fds=pass_fds,
        )
    except OSError as exc:
        return f"cannot run {haproxy}: {exc}"
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:  # superseded by a newer config: no orphan checks
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode == 0:
        return None
    return out.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}"


def running_master(pid_file: Path, config: Path) -> int | None:
    """The pid of a HAProxy master running on `config` (as `pid_file` says), if any."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(config).encode() in cmdline else None


class Haproxy:
    """The master process: `start()`, then `supervise()` as a task, `stop()` at the end."""

    def __init__(
        self,
        binary: str,
        config: Path,
        master_socket: Path,
        pid_file: Path | None = None,
        on_restart: Callable[[], None] | None = None,
        before_restart: Callable[[], None] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.binary = binary
        self.pass_fds = tuple(pass_fds)  # sockets the config binds as `fd@N`
        # A master whose reload failed waits with its old workers, having closed the
        # sockets it inherited: with `pass_fds`, it cannot load a config again.
        self.master_lost_fds = False
        self.on_restart = on_restart
        self.before_restart = before_restart  # brings the files up to date first
        self.pid_file = pid_file
        self.config = config
        self.master_socket = master_socket
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.stopping = False
        self.up = False
        self._started = asyncio.Event()  # set at each successful start()

    @property
    def argv(self) -> Sequence[str]:
        return (self.binary, "-Ws", "-S", f"{self.master_socket},mode,600", "-f", str(self.config))

    def _orphan(self) -> int | None:
        """A master a SIGKILLed reloader left running on this same config, if any."""
        pid = running_master(self.pid_file, self.config) if self.pid_file else None
        ours = self.proc is not None and self.proc.pid == pid
        return None if ours else pid

    async def start(self) -> None:
        """Start the master and wait for its first worker; StartFailed if it never comes."""
        orphan = self._orphan()
        with contextlib.suppress(FileNotFoundError):
            self.master_socket.unlink()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=self.pass_fds,
            )
        except OSError as exc:
            raise StartFailed(f"cannot run {self.binary}: {exc}") from exc
        proc = self.proc
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while asyncio.get_running_loop().time() < deadline:
            if proc.returncode is not None:
                raise StartFailed(f"haproxy exited with status {proc.returncode} at start")
            with contextlib.suppress(HaproxyError):
                if (await self.processes()).workers:
                    self.up = True
                    self._started.set()
                    if self.pid_file is not None:
                        # For operators: the master outlives a SIGKILL of the reloader.
                        self.pid_file.write_text(f"{proc.pid}\n")
                    log.info("haproxy started", pid=proc.pid)
                    if orphan is not None:
                        # Both listen (SO_REUSEPORT) until the old one finishes its
                        # requests and leaves: the takeover refuses no connection.
                        log.warning("soft-stopping a haproxy left behind", pid=orphan)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(orphan, signal.SIGUSR1)
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.05)
        await self._terminate(proc, 0)
        raise StartFailed(f"haproxy did not start a worker within {START_TIMEOUT}s")

    async def supervise(self) -> None:
        """Run forever: when the master dies, start it again (first retry within 0.1 s)."""
        backoff = Backoff(base=0.1, cap=1.0)
        while True:
            proc = self.proc
            assert proc is not None
            status = await proc.wait()
            if proc is not self.proc:
                continue  # a master replaced by a new one (see `_replace`)
            self.up = False
            if self.stopping:
                return
            log.error("haproxy exited, restarting", status=status, restarts=self.restarts + 1)
            if self.before_restart is not None:
                self.before_restart()
            while not self.stopping:
                self.restarts += 1
                try:
                    await self.start()
                    backoff.reset()
                    if self.on_restart is not None:
                        self.on_restart()
                    break
                except StartFailed as exc:
                    log.error("haproxy restart failed", error=str(exc), attempt=backoff.attempt + 1)
                    await asyncio.sleep(backoff.next_delay())

    async def processes(self) -> Processes:
        return parse_show_proc(await cli(self.master_socket, "show proc"))

    async def reload(self) -> Processes:
        """Ask the master to reload the config file; return once a new worker serves.

        A master that dies meanwhile is restarted by `supervise()`; the new one read the
        file at some moment around the rename that preceded this call, so it is reloaded
        in turn (not waited on for a worker of the dead one's reload that never comes)."""
        if self.master_lost_fds:
            await self._replace()
            return await self.processes()
        deadline = asyncio.get_running_loop().time() + RELOAD_TIMEOUT
        while True:
            master = self.proc
            try:
                return await self._reload(master, deadline)
            except _MasterGone:
                log.warning("haproxy master died during a reload; reloading its successor")
                await self._wait_for_successor(master, deadline)

    async def _reload(
        self, master: asyncio.subprocess.Process | None, deadline: float
    ) -> Processes:
        def gone() -> bool:
            return self.proc is not master or (master is not None and master.returncode is not None)

        try:
            before = await self.processes()
            await cli(self.master_socket, "reload")
        except HaproxyError:
            if gone():
                raise _MasterGone() from None
            raise
        while asyncio.get_running_loop().time() < deadline:
            if gone():
                raise _MasterGone()
            try:
                now = await self.processes()
            except HaproxyError:
                # The master re-executes itself: its socket is briefly away.
                await asyncio.sleep(0.02)
                continue
            if now.failed > before.failed:
                self.master_lost_fds = bool(self.pass_fds)
                raise ReloadFailed(f"haproxy reload failed ({now.failed} failures so far)")
            if now.reloads > before.reloads and set(now.workers) - set(before.workers):
                return now
            await asyncio.sleep(0.02)
        raise ReloadFailed(f"no new haproxy worker within {RELOAD_TIMEOUT}s of the reload")

    async def _wait_for_successor(
        self, master: asyncio.subprocess.Process | None, deadline: float
    ) -> None:
        """Until `supervise()` has a master other than `master` up, or ReloadFailed."""
        while not (self.up and self.proc is not master):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or self.stopping:
                raise ReloadFailed("haproxy died during the reload and is not back")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._started.wait(), left)
            self._started.clear()

    async def _replace(self) -> None:
        """A new master on the config file in place of this one, which is soft-stopped
        once the new one serves (both accept on the shared sockets meanwhile)."""
        old, self.proc = self.proc, None  # so that start() takes the old one as an orphan
        try:
            await self.start()
        except StartFailed as exc:
            self.proc = old
            raise ReloadFailed(f"a new haproxy master did not start: {exc}") from exc
        self.master_lost_fds = False
        log.info("haproxy master replaced", pid=self.proc.pid if self.proc else None)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Soft stop (SIGUSR1: finish current requests), then SIGTERM, then SIGKILL."""
        self.stopping = True
        if self.proc is not None:
            await self._terminate(self.proc, grace)
        self.up = False

    @staticmethod
    async def _terminate(proc: asyncio.subprocess.Process, grace: float) -> None:
        for sig, wait in ((signal.SIGUSR1, grace), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if proc.returncode is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), wait)
