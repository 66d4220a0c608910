"""TLS certificates as etcd records: `{prefix}/certs/{name}` holds a PEM chain + key.

The value is exactly what HAProxy loads from a `.pem` file (leaf certificate first, then
intermediates, then the private key), so the reloader writes it to disk and hands it to
the runtime API unchanged. Before that, it must be provably usable, because a bad
certificate at the edge fails every TLS handshake for its names:

- it parses: at least one CERTIFICATE block and exactly one unencrypted private key;
- the key matches the leaf certificate;
- it is valid now (not expired, not from the future beyond a small clock skew);
- the names it claims are well-formed host names (a `*.` wildcard at most in front),
  and a record named like a host name (`api.example.com`) covers that name.

A record failing any of these raises `RecordError`, like any other record: the CLI
refuses it, the reloader skips it and keeps serving the previous one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from fluster.records import RecordError, validate_host

MAX_CERT_BYTES: Final = 65536
MAX_CHAIN: Final = 8
CLOCK_SKEW: Final = timedelta(minutes=5)
CERT_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_BLOCK_RE: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.S)


def validate_cert_name(name: object) -> str:
    if not isinstance(name, str) or CERT_NAME_RE.fullmatch(name) is None:
        raise RecordError("cert", f"name must be 1-128 of [A-Za-z0-9_.-], got {str(name)[:80]!r}")
    return name


def validate_cert_host(name: str) -> str:
    """A name a certificate may claim: a host name, or `*.` + a host name."""
    if name.startswith("*."):
        return "*." + validate_host(name[2:], "names")
    return validate_host(name, "names")


def covers(names: Iterable[str], host: str) -> bool:
    """Whether a certificate for `names` is valid for `host` (one-label wildcards)."""
    host = host.lower().rstrip(".")
    for name in names:
        if name == host:
            return True
        if name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Certificate:
    """A validated certificate record; `pem` is what HAProxy loads."""

    name: str
    pem: str
    names: tuple[str, ...]
    issuer: str
    not_before: datetime
    not_after: datetime
    fingerprint: str  # sha256 of the leaf's DER, hex (what clients see)

    def covers(self, host: str) -> bool:
        return covers(self.names, host)

    def lifetime_used(self, now: datetime) -> float:
        """Fraction of the validity period gone (renewal starts at 2/3)."""
        total = (self.not_after - self.not_before).total_seconds()
        return 1.0 if total <= 0 else (now - self.not_before).total_seconds() / total

    @classmethod
    def parse(cls, name: str, raw: bytes | str, *, now: datetime | None = None) -> Certificate:
        """Validate an etcd value; raises RecordError saying what is wrong."""
        validate_cert_name(name)
        data = raw.encode() if isinstance(raw, str) else raw
        if len(data) > MAX_CERT_BYTES:
            raise RecordError("cert", f"larger than {MAX_CERT_BYTES} bytes")
        blocks = [(m.group(1).decode(), m.group(0)) for m in _BLOCK_RE.finditer(data)]
        certs = [b for kind, b in blocks if kind == "CERTIFICATE"]
        keys = [b for kind, b in blocks if kind.endswith("PRIVATE KEY")]
        if not certs:
            raise RecordError("cert", "no PEM CERTIFICATE block")
        if len(certs) > MAX_CHAIN:
            raise RecordError("cert", f"more than {MAX_CHAIN} certificates in the chain")
        chain = [_load_cert(b) for b in certs]
        if any(kind.startswith("ENCRYPTED") for kind, _ in blocks):
            raise RecordError("key", "encrypted private keys cannot be loaded unattended")
        if len(keys) != 1:
            raise RecordError("key", f"need exactly one PEM private key, found {len(keys)}")
        key = _load_key(keys[0])
        leaf = chain[0]
        if _public(leaf.public_key()) != _public(key.public_key()):
            raise RecordError("key", "does not match the certificate (the first in the chain)")
        _strong_enough(leaf, key)
        now = now or datetime.now(UTC)
        not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        if not_after <= now:
            raise RecordError("cert", f"expired at {not_after.isoformat()}")
        if not_before > now + CLOCK_SKEW:
            raise RecordError("cert", f"not valid before {not_before.isoformat()}")
        names = _names(leaf)
        if not names:
            raise RecordError("cert", "names no host (no subjectAltName DNS/IP, no CN)")
        if "." in name and not name.startswith("_"):
            try:
                host = validate_host(name, "cert")
            except RecordError:
                host = ""
            if host and not covers(names, host):
                raise RecordError("cert", f"named {name} but covers only {', '.join(names)}")
        # HAProxy gets the blocks only, re-joined: no stray text reaches its parser.
        pem = b"".join(c if c.endswith(b"\n") else c + b"\n" for c in [*certs, keys[0]])
        return cls(
            name=name,
            pem=pem.decode("ascii"),
            names=names,
            issuer=leaf.issuer.rfc4514_string()[:300],
            not_before=not_before,
            not_after=not_after,
            fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        )


def _load_cert(block: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(block)
    except ValueError as exc:
        raise RecordError("cert", f"unreadable certificate ({str(exc)[:120]})") from None


_Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _load_key(block: bytes) -> _Key:
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError) as exc:
        raise RecordError("key", f"unreadable private key ({str(exc)[:120]})") from None
    if not isinstance(key, _Key):  # HAProxy and browsers: RSA, ECDSA, Ed25519
        raise RecordError("key", f"unsupported key type {type(key).__name__}")
    return key


WEAK_HASHES: Final = ("md5", "sha1")
CURVES: Final = ("secp256r1", "secp384r1", "secp521r1")


def _strong_enough(leaf: x509.Certificate, key: _Key) -> None:
    """What OpenSSL's default security level (2, Debian's) refuses to load: HAProxy would
    fail every reload with such a file in its crt-list, so it must never get there."""
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise RecordError("key", f"RSA key of {key.key_size} bits; at least 2048 needed")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in CURVES:
        raise RecordError("key", f"curve {key.curve.name} not supported; use P-256 or P-384")
    algorithm = leaf.signature_hash_algorithm
    if algorithm is not None and algorithm.name in WEAK_HASHES:
        raise RecordError("cert", f"signed with {algorithm.name}, which TLS refuses")


def _public(key: object) -> bytes:
    assert hasattr(key, "public_bytes")
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    """The host names a certificate claims: its SANs, or its CN when it has none."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        raw = [*san.get_values_for_type(x509.DNSName)]
        raw += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        raw = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    except ValueError as exc:
        raise RecordError("cert", f"unreadable subjectAltName ({str(exc)[:120]})") from None
    return tuple(sorted({validate_cert_host(n) for n in raw}))


def self_signed(
    names: Iterable[str],
    *,
    days: float = 3650,
    now: datetime | None = None,
    not_before: datetime | None = None,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate for `names`: (certificate PEM, key PEM).

    The reloader's default certificate (answers names no record covers) is made here;
    tests make their certificates with it too.
    """
    names = list(names)
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.now(UTC)
    start = not_before or now - timedelta(minutes=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()
