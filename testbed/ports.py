"""Loopback ports for the parts tests and the bench start, and what to do when one is taken.

`free_port()` (testbed/etcd.py) asks the kernel for a free port and releases it at once,
so the part that binds it next is in a race: on a busy machine another process can take
the port in between. Parts that can bind port 0 and report what they got should; the
others (a port written into a label, a compose file or a config before the start) are
started again on fresh ports when their log says the port was taken, at most
`PORT_ATTEMPTS` times, and then fail saying so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

# HAProxy: "cannot bind socket (Address already in use)"; Python: "[Errno 98] Address
# already in use"; etcd and Docker's proxy: "bind: address already in use"; Docker's
# port allocator, when a container holds the port: "port is already allocated".
ADDRESS_IN_USE = re.compile(r"address already in use|port is already allocated", re.IGNORECASE)
PORT_ATTEMPTS = 3
T = TypeVar("T")


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
