"""Loopback ports for the parts tests and the bench start, and what to do when one is taken.

`free_port()` hands out ports that nothing listens on from below the kernel's ephemeral
range, so that no outgoing connection is given one between the check and the bind, and
from a slice of that range of the test worker's own (pytest-xdist workers run side by
side: each gets a disjoint slice). It walks its slice from a random start, so a port
comes back only after the whole slice. The part that binds the port is still in a race
with any other process on the machine. Parts that can bind port 0 and report what they
got should; the others (a port written into a label, a compose file or a config before
the start) are started again on fresh ports when their log says the port was taken, at
most `PORT_ATTEMPTS` times, and then fail saying so.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# HAProxy: "cannot bind socket (Address already in use)"; Python: "[Errno 98] Address
# already in use"; etcd and Docker's proxy: "bind: address already in use"; Docker's
# port allocator, when a container holds the port: "port is already allocated".
ADDRESS_IN_USE = re.compile(r"address already in use|port is already allocated", re.IGNORECASE)
PORT_ATTEMPTS = 3
FIRST_PORT = 20000  # the bottom of the ports free_port() hands out
T = TypeVar("T")


def _below_ephemeral() -> int:
    """The last port below the kernel's ephemeral range (32767 on Linux's default)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low - 1, FIRST_PORT + 1000)


def worker_ports() -> range:
    """This test worker's slice of FIRST_PORT up to the ephemeral range."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ...
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (_below_ephemeral() + 1 - FIRST_PORT) // max(count, 1)
    return range(FIRST_PORT + index * size, FIRST_PORT + (index + 1) * size)


_walk = itertools.count(random.randrange(1 << 16))


def free_port() -> int:
    """A loopback port nothing is bound to now, from this worker's slice."""
    ports = worker_ports()
    for _ in range(len(ports)):
        port = ports[next(_walk) % len(ports)]
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def lost_a_port(log: str) -> bool:
    """Whether `log` says a bind failed because another process holds the port."""
    return ADDRESS_IN_USE.search(log) is not None


class PortsLost(AssertionError):
    """A part lost a port to another process on every one of its `PORT_ATTEMPTS`."""


def start_on_fresh_ports(
    start: Callable[[], T], lost: Callable[[], bool], again: Callable[[], None], what: str
) -> T:
    """`start()` a part whose ports were picked by `free_port()`; when it fails and
    `lost()` says (from the log of that attempt) that a port was taken, `again()` stops
    what is left of it and picks fresh ports, and it starts again, at most
    `PORT_ATTEMPTS` times. Any other failure is raised as it is; `what` names the part
    and its log for the error that ends the last attempt."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            return start()
        except AssertionError as err:
            if not lost():
                raise
            if attempt == PORT_ATTEMPTS:
                raise PortsLost(
                    f"{what} lost a port to another process {PORT_ATTEMPTS} times in a row: {err}"
                ) from err
            again()
    raise AssertionError("unreachable")
