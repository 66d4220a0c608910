"""The app the deploy tests commit and push: its source, its Dockerfile, a git identity.

The app answers its mark (the version a test expects to see) and, when told to be sick,
fails its health check, so a test can tell which version serves and make a deploy fail.
"""

from __future__ import annotations

from testbed.docker import BASE_IMAGE

IDENTITY = {
    "GIT_AUTHOR_NAME": "Dev",
    "GIT_AUTHOR_EMAIL": "dev@example.invalid",
    "GIT_COMMITTER_NAME": "Dev",
    "GIT_COMMITTER_EMAIL": "dev@example.invalid",
}

APP = """\
import http.server, os, signal, sys
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
MARK, SICK = {mark!r}, {sick!r}
print(f"app {{MARK}} starting", flush=True)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        sick = SICK and self.path == "/health"
        body = (b"sick " if sick else b"") + MARK.encode()
        self.send_response(500 if sick else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if sick:
            print(f"health check failed on purpose ({{MARK}})", flush=True)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("", int(os.environ["PORT"])), H).serve_forever()
"""

DOCKERFILE = f"""\
FROM {BASE_IMAGE}
ENV PYTHONUNBUFFERED=1
COPY app.py /app.py
{{extra}}CMD ["python3", "/app.py"]
"""

# The day-2 app: answers `{mark} {COLOR}`, its code's mark and its environment's COLOR,
# so a test tells a code release from a config release by what it is served; COLOR=crash
# makes it exit at start, COLOR=flaky answer 500 to one request in five (not /health).
COLOR_APP = """\
import http.server, os, signal, sys
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
BODY = ({mark!r} + " " + os.environ.get("COLOR", "-")).encode()
print("app {mark} starting with COLOR=" + os.environ.get("COLOR", "-"), flush=True)
if os.environ.get("COLOR") == "crash":  # a config that cannot work (a bad DATABASE_URL)
    sys.exit("no such colour: crash")
SEEN = [0]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        SEEN[0] += 1  # COLOR=flaky: healthy, yet every fifth answer is a 500
        flaky = os.environ.get("COLOR") == "flaky" and SEEN[0] % 5 == 0
        self.send_response(500 if flaky and self.path != "/health" else 200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("", int(os.environ["PORT"])), H).serve_forever()
"""
