"""A tiny HTTP app for churn and chaos runs: one process per instance, so that it can
be killed like a container's process, answering every GET with its own name.

    python -m testbed.app NAME PORTFILE

It binds 127.0.0.1 on a port of the kernel's choosing (no free-port race), writes the
port to PORTFILE once it listens, and keeps client connections alive (HTTP/1.1), as an
app behind HAProxy's connection pool does. `/slow` answers after 200 ms, so a run can
have requests in flight when the process dies.
"""

from __future__ import annotations

import http.server
import os
import sys
import time
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    name = b""

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(0.2)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.name)))
        self.end_headers()
        self.wfile.write(self.name)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    name, portfile = sys.argv[1], Path(sys.argv[2])
    Handler.name = name.encode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = portfile.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    os.replace(tmp, portfile)
    server.serve_forever()


if __name__ == "__main__":
    main()
