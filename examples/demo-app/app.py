"""The demo service: answers every request with which instance served it and its version.

Standard library only, so the image needs nothing but python3. It exists to make load
balancing and version switches visible (`curl -H 'Host: web.localhost' 127.0.0.1:8080`)
and to behave like a well-mannered app under a rolling deploy: on SIGTERM it first fails
its health check and keeps serving for DRAIN_SECONDS, so the sidekick and HAProxy move
traffic away before the listener closes; requests in flight finish before it exits.

Settings (environment): PORT (8000), APP_VERSION ("dev"), INSTANCE_ID (the hostname, which
Docker sets to the container id), DRAIN_SECONDS (3).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(os.environ.get("PORT", "8000"))
VERSION = os.environ.get("APP_VERSION", "dev")
INSTANCE = os.environ.get("INSTANCE_ID") or socket.gethostname()
DRAIN_SECONDS = float(os.environ.get("DRAIN_SECONDS", "3"))

stopping = threading.Event()


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so HAProxy never reuses a connection this
    # process is about to close (no reset races while draining).
    protocol_version = "HTTP/1.0"
    server_version = "fluster-demo"

    def do_GET(self) -> None:
        if self.path.startswith("/health"):
            if stopping.is_set():
                self.reply(503, {"status": "draining", "instance": INSTANCE})
            else:
                self.reply(200, {"status": "ok", "instance": INSTANCE})
            return
        self.reply(
            200,
            {"instance": INSTANCE, "version": VERSION, "path": self.path},
            text=f"hello from {INSTANCE} version {VERSION}\n",
        )

    def do_HEAD(self) -> None:
        self.do_GET()

    def reply(self, status: int, body: dict[str, str], text: str | None = None) -> None:
        as_json = text is None or "application/json" in self.headers.get("Accept", "")
        data = (json.dumps(body) + "\n" if as_json else text or "").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if as_json else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Instance", INSTANCE)
        self.send_header("X-Version", VERSION)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        if os.environ.get("ACCESS_LOG"):
            super().log_message(format, *args)


def main() -> None:
    server = ThreadingHTTPServer(("", PORT), Handler)
    server.daemon_threads = False  # exit waits for requests in flight
    server.block_on_close = True

    def on_term(signum: int, _frame: object) -> None:
        # Only flag here; the main thread does the slow part.
        stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    print(f"demo app {INSTANCE} version {VERSION} on :{PORT}", flush=True)
    stopping.wait()
    print(f"draining for {DRAIN_SECONDS}s", flush=True)
    time.sleep(DRAIN_SECONDS)  # the drain period itself, not synchronisation
    server.shutdown()
    server.server_close()
    print("stopped", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
