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

import socket

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


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
