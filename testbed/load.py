"""Request loops through HAProxy that keep every answer and every failure.

The deploy tests assert on them (no request fails while a version replaces another) and
the bench times with them (when the last answer of the old version was seen). Two loops
run side by side, one opening a connection per request and one keeping its connection
alive, because a reload or a drain can fail either kind of client on its own.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from typing import Self


class RequestLoops:
    """Two bounded request loops to `127.0.0.1:port` for `host`, stopped on leaving.

    A 200 goes to `answered` (a subclass says what it keeps); anything else, a refused
    or dropped connection, or a body `answered` rejects with ValueError, is a failure.
    """

    def __init__(
        self,
        port: int,
        host: str,
        *,
        limit: float,
        pace: float = 0.005,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.port, self.host, self.limit, self.pace = port, host, limit, pace
        self.headers = {"Host": host, **(headers or {})}
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._loop, args=(keep,), daemon=True) for keep in (False, True)
        ]

    def answered(self, body: bytes, sent: float) -> None:
        """Keep one 200 answer to a request sent at `sent` (time.monotonic(); called
        with `self.lock` held)."""
        raise NotImplementedError

    def _failed(self, keep_alive: bool, what: str) -> None:
        with self.lock:
            loop = "keep-alive" if keep_alive else "new"
            self.failures.append(f"{time.strftime('%T')} {loop}: {what}")

    def _loop(self, keep_alive: bool) -> None:
        deadline = time.monotonic() + self.limit
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                sent = time.monotonic()
                conn.request("GET", "/", headers=self.headers)
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    with self.lock:
                        self.answered(body, sent)
                else:
                    self._failed(keep_alive, f"{resp.status} {body[:80].decode(errors='replace')}")
                if not keep_alive or resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._failed(keep_alive, repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
            if self.pace:
                time.sleep(self.pace)  # pacing, not synchronisation
        if conn is not None:
            conn.close()

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


class Load(RequestLoops):
    """Request loops that count answers by body (the app answers its version's mark)."""

    def __init__(self, port: int, host: str, limit: float = 240.0, pace: float = 0.005) -> None:
        super().__init__(port, host, limit=limit, pace=pace)
        self.served: Counter[str] = Counter()
        self.recent: list[tuple[float, str]] = []  # (sent, body) of the last answers

    def answered(self, body: bytes, sent: float) -> None:
        text = body.decode()
        self.served[text] += 1
        self.recent = [*self.recent[-39:], (sent, text)]

    def only(self, count: int = 20, within: float = 15.0) -> set[str]:
        """The bodies of the first `count` answers to requests sent from now on: one
        element once one version serves alone. (Answers already on their way were
        sent earlier, so a slow machine cannot mix an older version in.)"""
        since = time.monotonic()
        deadline = since + within
        while True:
            with self.lock:
                after = [text for sent, text in self.recent if sent >= since]
            if len(after) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.01)  # polling the loops' answers
        if not after:
            raise AssertionError(f"no answer to a request sent in {within} s: {self.failures[-5:]}")
        return set(after[:count])
