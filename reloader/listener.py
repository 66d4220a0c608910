"""The shared HTTP frontend's listening socket: held by the reloader, lent to HAProxy.

A socket HAProxy binds itself lives in its worker: when the worker dies (a crash, the
OOM killer, `kill -9`), the port is closed until the reloader has HAProxy running again,
and every connection attempt meanwhile is refused (a chaos soak counted 1,000 a time).
So the reloader binds the port once, at start, and hands the socket to every HAProxy it
runs (`bind fd@N`, inherited): when a worker dies the socket stays open, the kernel
queues new connections in its backlog, and the next HAProxy accepts them. Reloads are
unchanged (the master passes the listener on), and so is a takeover after a SIGKILLed
reloader (SO_REUSEPORT, as HAProxy's own binds have).
"""

from __future__ import annotations

import ctypes
import os
import re
import socket

import structlog

from reloader.haproxy import running_master
from reloader.model import RenderSettings
from reloader.state_dir import StateDir

log = structlog.get_logger("reloader.listener")

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


def http_listener(render: RenderSettings) -> socket.socket:
    """The socket for the shared HTTP frontend: the one a SIGKILLed reloader lent the
    HAProxy it left running on this state dir, else a new one; OSError if neither."""
    files = StateDir(render.state_dir)
    pid = running_master(files.pid_file, files.config)
    if pid is not None:
        try:
            fd = lent_fd(files.config.read_text())
        except OSError:
            fd = None
        sock = adopt_listener(pid, fd, render.http_bind[1]) if fd is not None else None
        if sock is not None:
            log.info("took over the HTTP socket of the haproxy left behind", pid=pid)
            return sock
    return open_listener(*render.http_bind)


def open_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port` ("" for every IPv4 address), inheritable
    by the HAProxy processes it is passed to; OSError as the kernel says it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        sock.listen(BACKLOG)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


# pidfd_getfd(2), Linux 5.6: the same number on every architecture (added after 424).
SYS_PIDFD_GETFD = 438
_LENT = re.compile(r"^\s*bind fd@(\d+)", re.MULTILINE)


def lent_fd(config: str) -> int | None:
    """The fd a config's HTTP frontend binds (`bind fd@N`), if it has one."""
    match = _LENT.search(config)
    return int(match[1]) if match else None


def adopt_listener(pid: int, fd: int, port: int) -> socket.socket | None:
    """The listening socket HAProxy master `pid` holds as `fd`, duplicated into this
    process, if it listens on `port`; None when it cannot be had (no pidfd_getfd, no
    ptrace rights: in a container without CAP_SYS_PTRACE, say).

    A reloader that was SIGKILLed leaves its HAProxy serving on the socket it lent it.
    Taking over with a new socket beside it (SO_REUSEPORT) would reset the connections
    queued on the old one when the old HAProxy stops; taking over the same socket resets
    none."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dup = int(libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    finally:
        os.close(pidfd)
    if dup < 0:
        return None
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        if sock.type != socket.SOCK_STREAM or not listening or sock.getsockname()[1] != port:
            sock.close()
            return None
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        return None
    return sock
