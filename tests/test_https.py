"""HTTPS at the edge with a real reloader, real HAProxy, openssl s_client and curl.

Certificates come from etcd; every check looks at what a TLS client on loopback sees:
the certificate served for each SNI name, the ALPN protocol, redirects, and that a
rotation changes the certificate without a new HAProxy worker.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable

from fluster.certs import Certificate
from tests.support.certs import expired, mismatched, pem, s_client_subject
from tests.support.etcd import Etcd, wait_for
from tests.support.haproxy import HttpBackend, ReloaderProcess, unix_command

Start = Callable[..., ReloaderProcess]
Backends = Callable[..., list[HttpBackend]]
KEY = "/fluster/services/{}/instances/{}"
SPEC = "/fluster/services/{}/spec"
CERT = "/fluster/certs/{}"


def served_fingerprint(port: int, name: str) -> str:
    """sha256 of the certificate HAProxy presents for SNI `name` on a new handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def curl(port: int, host: str, path: str = "/", *extra: str) -> dict[str, str]:
    """One HTTPS request with curl --resolve (so SNI and Host are `host`)."""
    out = subprocess.run(
        [
            "curl",
            "-sk",
            "--max-time",
            "10",
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{http_version}",
            *extra,
            f"https://{host}:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout
    body, _, tail = out.rpartition("\n")
    code, _, version = tail.partition(" ")
    return {"body": body, "code": code, "version": version}


def reload_counters(reloader: ReloaderProcess) -> tuple[str, ...]:
    """The master's `show proc` reload and failure counts."""
    match = re.search(r"master\s+(\d+)\s+\[failed:\s*(\d+)\]", reloader.master("show proc"))
    assert match is not None
    return match.groups()


def start_https(start_reloader: Start) -> tuple[ReloaderProcess, int]:
    """A reloader with an HTTPS frontend on a port of its own (retried like its others)."""
    reloader = start_reloader(https=True)
    assert reloader.https_port is not None
    return reloader, reloader.https_port


def test_sni_http2_default_certificate_policy_and_redirect(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    web, api, plain = backends(3)
    etcd.put(SPEC.format("web"), json.dumps({"hosts": ["web.test"], "hsts_seconds": 600}))
    etcd.put(SPEC.format("api"), json.dumps({"hosts": ["api.test"], "https": "on"}))
    etcd.put(KEY.format("web", "a"), web.json())
    etcd.put(KEY.format("api", "a"), api.json())
    etcd.put(KEY.format("plain", "a"), plain.json())
    etcd.put(CERT.format("web.test"), pem("web.test"))
    etcd.put(CERT.format("api"), pem("api.test"))
    reloader, port = start_https(start_reloader)

    # each name gets its own certificate; an unknown name gets the edge's default one
    wait_for(lambda: "CN = web.test" in s_client_subject(port, "web.test"), what="web.test cert")
    assert "CN = api.test" in s_client_subject(port, "api.test")
    assert "fluster-default.invalid" in s_client_subject(port, "nobody.test")
    # HTTP/2 by ALPN, routed like the HTTP frontend, HSTS where the spec asks
    reply = curl(port, "web.test", "/", "--http2", "-D", "/dev/stderr")
    assert reply == {"body": web.ident, "code": "200", "version": "2"}, reply
    assert curl(port, "api.test", "/", "--http1.1") == {
        "body": api.ident,
        "code": "200",
        "version": "1.1",
    }
    hsts = subprocess.run(
        ["curl", "-skI", "--resolve", f"web.test:{port}:127.0.0.1", f"https://web.test:{port}/"],
        capture_output=True,
        text=True,
        timeout=20,
    ).stdout.lower()
    assert "strict-transport-security: max-age=600" in hsts, hsts
    # policy: web (a certificate, no policy) redirects; api ("on") serves both schemes;
    # plain (no certificate) is HTTP only
    conn_status = reloader.get("web.test", "/x?y=1")
    assert conn_status[0] == 308
    location = _location(reloader.http_port, "web.test", "/x?y=1")
    assert location == f"https://web.test:{port}/x?y=1"
    assert reloader.get("web.test", "/.well-known/acme-challenge/tok") == (200, web.ident)
    assert reloader.get("api.test") == (200, api.ident)
    assert reloader.get("plain.localhost") == (200, plain.ident)
    assert curl(port, "plain.localhost")["code"] == "404"
    status = reloader.status()
    assert sorted(status["certificates"]) == ["api", "web.test"]
    assert status["https"] is True
    code, metrics = reloader.http_get("/metrics")
    assert code == 200
    assert 'reloader_certificate_expiry_seconds{cert="web.test"}' in metrics
    assert "reloader_certificates 2.0" in metrics


def _location(port: int, host: str, path: str) -> str:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host})
        return conn.getresponse().getheader("Location") or ""
    finally:
        conn.close()


def test_rotation_under_load_changes_the_certificate_without_a_new_worker(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    (web,) = backends(1)
    etcd.put(SPEC.format("web"), json.dumps({"hosts": ["web.test"], "https": "on"}))
    etcd.put(KEY.format("web", "a"), web.json())
    first = pem("web.test")
    etcd.put(CERT.format("web"), first)
    reloader, port = start_https(start_reloader)
    fp = Certificate.parse("web", first).fingerprint
    wait_for(lambda: served_fingerprint(port, "web.test") == fp, what="first certificate")
    workers = reloader.workers()
    reloads_before = reload_counters(reloader)

    stop = threading.Event()
    results = {"ok": 0, "failed": 0}
    errors: list[str] = []

    def loop() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        while not stop.is_set() and results["ok"] + results["failed"] < 20000:
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                    ctx.wrap_socket(raw, server_hostname="web.test") as tls,
                ):
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
                    data = b""
                    while chunk := tls.recv(4096):
                        data += chunk
                ok = data.startswith(b"HTTP/1.1 200") and data.endswith(web.ident.encode())
                results["ok" if ok else "failed"] += 1
                if not ok:
                    errors.append(data[:200].decode(errors="replace"))
            except (OSError, ssl.SSLError) as exc:
                results["failed"] += 1
                errors.append(repr(exc))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            new = pem("web.test")
            etcd.put(CERT.format("web"), new)
            fp = Certificate.parse("web", new).fingerprint
            wait_for(
                lambda fp=fp: served_fingerprint(port, "web.test") == fp,  # type: ignore[misc]
                what=f"rotated certificate served (log: {reloader.log_path})",
            )
    finally:
        stop.set()
        thread.join(30)
    assert results["failed"] == 0, (results, errors[:5])
    assert results["ok"] > 0
    assert reloader.workers() == workers, "a rotation must not start a new worker"
    assert reload_counters(reloader) == reloads_before, "show proc: the master reloaded"
    # the files follow, so a reload serves the rotated certificate too
    unix_command(reloader.state_dir / "master.sock", "reload")  # no reply: the master re-execs
    wait_for(lambda: reloader.workers() != workers, what="a new worker after reload")
    wait_for(lambda: served_fingerprint(port, "web.test") == fp, what="rotated cert after reload")


def test_invalid_certificates_are_skipped_and_the_old_one_keeps_serving(
    etcd: Etcd, start_reloader: Start, backends: Backends
) -> None:
    (web,) = backends(1)
    etcd.put(SPEC.format("web"), json.dumps({"hosts": ["web.test"]}))
    etcd.put(KEY.format("web", "a"), web.json())
    good = pem("web.test")
    etcd.put(CERT.format("web.test"), good)
    reloader, port = start_https(start_reloader)
    fp = Certificate.parse("web.test", good).fingerprint
    wait_for(lambda: served_fingerprint(port, "web.test") == fp, what="good certificate")
    for bad, reason in [
        ("garbage", "no PEM CERTIFICATE"),
        (mismatched("web.test"), "does not match"),
        (expired("web.test"), "expired"),
        (pem("other.test"), "covers only other.test"),
    ]:
        etcd.put(CERT.format("web.test"), bad)
        wait_for(
            lambda reason=reason: (
                reason  # type: ignore[misc]
                in reloader.status()["rejected_certificates"].get("web.test", "")
            ),
            what=f"rejection {reason!r}",
        )
        assert served_fingerprint(port, "web.test") == fp
        assert curl(port, "web.test")["body"] == web.ident
    # a bad record under a new name hurts nobody
    etcd.put(CERT.format("junk"), "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n")
    wait_for(lambda: "junk" in reloader.status()["rejected_certificates"], what="junk rejected")
    assert "reloader_rejected_certificates 2.0" in reloader.http_get("/metrics")[1]
    assert served_fingerprint(port, "web.test") == fp
    # deleting the record stops serving it: the default certificate answers
    etcd.delete(CERT.format("web.test"))
    wait_for(lambda: served_fingerprint(port, "web.test") != fp, what="certificate removed")
    assert "fluster-default.invalid" in s_client_subject(port, "web.test")
