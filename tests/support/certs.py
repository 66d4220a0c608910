"""Certificates for tests: good ones, and each kind of bad one the edge must refuse."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fluster.certs import self_signed


def pem(*names: str, days: float = 30, not_before: datetime | None = None) -> str:
    """A self-signed chain + key for `names`, as stored in etcd."""
    cert, key = self_signed(names, days=days, not_before=not_before)
    return cert + key


def expired(*names: str) -> str:
    now = datetime.now(UTC)
    cert, key = self_signed(names, days=-1, now=now, not_before=now - timedelta(days=10))
    return cert + key


def mismatched(*names: str) -> str:
    """The certificate of one key pair with the private key of another."""
    cert, _ = self_signed(names)
    _, other = self_signed(names)
    return cert + other


def write_pair(directory: Path, name: str, text: str) -> tuple[Path, Path]:
    """Split a chain + key into the two files `fluster cert add` takes."""
    split = text.index("-----BEGIN PRIVATE KEY-----")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_text(text[:split])
    key.write_text(text[split:])
    return cert, key


def s_client(port: int, name: str) -> str:
    """What `openssl s_client` prints for a TLS handshake with the edge on `port` for `name`."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name],
        input="",
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout


def s_client_subject(port: int, name: str) -> str:
    """The `subject=` line of the certificate served for `name` (else the output's tail)."""
    out = s_client(port, name)
    return next((line for line in out.splitlines() if line.startswith("subject=")), out[-500:])
