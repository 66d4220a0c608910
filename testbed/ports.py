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

# HAProxy: "cannot bind socket (Address already in use)"; Python: "[Errno 98] Address
# already in use"; etcd and Docker's proxy: "bind: address already in use"; Docker's
# port allocator, when a container holds the port: "port is already allocated".
ADDRESS_IN_USE = re.compile(r"address already in use|port is already allocated", re.IGNORECASE)
PORT_ATTEMPTS = 3


def lost_a_port(log: str) -> bool:
    """Whether `log` says a bind failed because another process holds the port."""
    return ADDRESS_IN_USE.search(log) is not None
