"""Certificate records: what the edge accepts, and every refusal with its reason.

Pure validation first (no I/O), then `fluster cert add|ls|rm` against a real etcd.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fluster.certs import Certificate, covers
from fluster.records import RecordError
from fluster.settings import SettingsError
from tests.support.certs import expired, mismatched, pem, write_pair
from tests.support.etcd import Etcd

PREFIX = "/fluster"


def test_a_good_chain_parses_with_its_names_and_dates() -> None:
    cert = Certificate.parse("api.example.com", pem("api.example.com", "*.api.example.com"))
    assert cert.names == ("*.api.example.com", "api.example.com")
    assert cert.covers("API.example.com") and cert.covers("v2.api.example.com")
    assert not cert.covers("x.v2.api.example.com") and not cert.covers("example.com")
    assert cert.not_after - cert.not_before > timedelta(days=29)
    assert cert.pem.startswith("-----BEGIN CERTIFICATE-----")
    assert cert.pem.rstrip().endswith("-----END PRIVATE KEY-----")


def test_stray_text_around_the_blocks_never_reaches_haproxy() -> None:
    cert = Certificate.parse("web", "comment\n" + pem("web.test") + "trailer\n")
    assert "comment" not in cert.pem and "trailer" not in cert.pem


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("web", "garbage", "no PEM CERTIFICATE block"),
        ("web", pem("web.test").split("-----BEGIN PRIVATE")[0], "exactly one PEM private key"),
        ("web", mismatched("web.test"), "does not match"),
        ("web", expired("web.test"), "expired at"),
        (
            "web",
            pem("web.test", not_before=datetime.now(UTC) + timedelta(days=1)),
            "not valid before",
        ),
        ("api.example.com", pem("web.example.com"), "covers only web.example.com"),
        ("bad/name", pem("web.test"), "name must be"),
        ("web", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "unreadable"),
        ("web", pem("web.test") * 200, "larger than"),
    ],
)
def test_bad_certificates_are_refused_with_a_reason(name: str, value: str, reason: str) -> None:
    with pytest.raises(RecordError, match=reason):
        Certificate.parse(name, value)


def test_wildcards_cover_one_label_only() -> None:
    assert covers(("*.example.com",), "a.example.com")
    assert not covers(("*.example.com",), "example.com")
    assert not covers(("*.example.com",), "a.b.example.com")


def test_renewal_point_is_a_fraction_of_the_lifetime() -> None:
    cert = Certificate.parse("w", pem("w.test", days=90))
    assert 0 <= cert.lifetime_used(datetime.now(UTC)) < 0.01
    assert cert.lifetime_used(cert.not_before + timedelta(days=60)) > 0.66


# -- the CLI against a real etcd ----------------------------------------------------------


def test_cert_add_ls_rm(etcd: Etcd, cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    etcd.put(f"{PREFIX}/services/api/spec", json.dumps({"hosts": ["api.example.com"]}))
    crt, key = write_pair(tmp_path, "api", pem("api.example.com"))
    code, out, err = cli("cert", "add", "api.example.com", "--cert", str(crt), "--key", str(key))
    assert code == 0, err
    stored = etcd.ctl("get", "--print-value-only", f"{PREFIX}/certs/api.example.com").stdout
    assert "BEGIN CERTIFICATE" in stored and "BEGIN PRIVATE KEY" in stored
    # a second add of the same name is refused unless it says it rotates
    code, _, err = cli("cert", "add", "api.example.com", "--cert", str(crt), "--key", str(key))
    assert code == 4 and "--replace" in err
    assert (
        cli("cert", "add", "api.example.com", "--cert", str(crt), "--key", str(key), "--replace")[0]
        == 0
    )
    etcd.put(f"{PREFIX}/certs/junk", "not a certificate")
    code, out, _ = cli("cert", "ls")
    assert code == 0
    assert "api.example.com" in out and "CN=api.example.com" in out and "api\n" in out + "\n"
    assert "invalid, not served: junk: cert: no PEM CERTIFICATE block" in out
    listing = json.loads(cli("cert", "ls", "--json")[1])
    assert listing["certs"]["api.example.com"]["services"] == ["api"]
    assert cli("cert", "rm", "api.example.com")[0] == 0
    code, _, err = cli("cert", "rm", "api.example.com")
    assert code == 4 and "no certificate" in err


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (mismatched("w.test"), "does not match"),
        (expired("w.test"), "expired"),
    ],
)
def test_cert_add_refuses_bad_pairs_and_writes_nothing(
    etcd: Etcd,
    cli,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    value: str,
    reason: str,
) -> None:
    crt, key = write_pair(tmp_path, "w", value)
    code, _, err = cli("cert", "add", "w", "--cert", str(crt), "--key", str(key))
    assert code == 2 and reason in err and "Traceback" not in err
    assert etcd.ctl("get", "--prefix", "--keys-only", f"{PREFIX}/certs/").stdout.strip() == ""


def test_cert_add_names_a_missing_file(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = cli("cert", "add", "w", "--cert", str(tmp_path / "no"), "--key", "x")
    assert code == 2 and "cannot read" in err


def test_policy_per_host_defaults_to_redirect_when_a_certificate_covers_it() -> None:
    from fluster.catalog import Service, Snapshot
    from fluster.records import ServiceSpec
    from reloader.certs import target

    def svc(name: str, **spec: object) -> Service:
        return Service(name, ServiceSpec.from_dict(spec), has_spec=True)

    snap = Snapshot(
        1,
        {
            "web": svc("web", hosts=["web.test"], hsts_seconds=60),
            "api": svc("api", hosts=["web.test"], path_prefix="/api", https="on"),
            "plain": svc("plain"),
            "db": svc("db", mode="tcp", port=5432),
            "v6": svc("v6", hosts=["::1"], https="on"),
        },
    )
    cert = Certificate.parse("web", pem("web.test"))
    want = target({"web": cert}, snap, "localhost")
    assert dict(want.policy) == {"[::1]": "on", "plain.localhost": "off", "web.test": "redirect"}
    assert dict(want.hsts) == {"web.test": 60}
    assert list(want.certs) == ["web"] and want.certs["web"] == cert.pem
    # without the certificate, web falls back to off; api's explicit "on" wins the host
    assert target({}, snap, "localhost").policy["web.test"] == "on"


def test_keys_and_signatures_openssl_would_refuse_are_refused() -> None:
    """HAProxy (OpenSSL security level 2) fails a reload on such a file: never load it."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(RecordError, match="1024 bits"):
        Certificate.parse("w", "".join(_rsa_self_signed(weak)))
    strong = rsa.generate_private_key(65537, 2048)
    assert Certificate.parse("w", "".join(_rsa_self_signed(strong))).names == ("w.test",)


def _rsa_self_signed(key: object) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("w.test")]), False)
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    key_pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def test_https_bind_auto_waits_for_a_certificate_an_address_binds_always() -> None:
    from fluster.catalog import Snapshot
    from reloader import settings
    from reloader.build import build_model

    def render(argv: list[str], tls: bool) -> tuple[str, int] | None:
        s = settings.load(["--state-dir", "/tmp/x", *argv], {})
        return build_model(Snapshot(), s.render, tls=tls).https_bind

    assert render([], tls=False) is None
    assert render([], tls=True) == ("", 443)
    assert render(["--https-bind", "127.0.0.1:8443"], tls=False) == ("127.0.0.1", 8443)
    assert render(["--https-bind", "off"], tls=True) is None
    with pytest.raises(SettingsError, match="--https-bind"):
        settings.load(["--https-bind", "nonsense"], {})


def test_watcher_keeps_the_last_valid_certificate_of_a_name() -> None:
    """CertWatcher's bookkeeping, fed etcd's shapes directly (no etcd needed for this)."""
    from fluster.store import Event, KeyValue, WatchBatch
    from reloader.certs import CertWatcher

    def kv(name: str, value: str, rev: int) -> KeyValue:
        return KeyValue(f"/fluster/certs/{name}", value.encode(), rev, rev)

    watcher = CertWatcher(None, "/fluster")  # type: ignore[arg-type]
    good = pem("web.test")
    watcher.on_list(5, [kv("web.test", good, 5), kv("junk", "nope", 4)])
    assert list(watcher.certs) == ["web.test"] and "junk" in watcher.rejected
    fp = watcher.certs["web.test"].fingerprint
    watcher.on_events(WatchBatch(6, (Event("put", kv("web.test", expired("web.test"), 6)),)))
    assert watcher.certs["web.test"].fingerprint == fp, "the old one keeps serving"
    assert "expired" in watcher.rejected["web.test"]
    # a relist (after compaction) still remembers it while the key holds junk
    watcher.on_list(7, [kv("web.test", "junk", 6)])
    assert watcher.certs["web.test"].fingerprint == fp
    newer = pem("web.test")
    watcher.on_events(WatchBatch(8, (Event("put", kv("web.test", newer, 8)),)))
    assert watcher.certs["web.test"].fingerprint != fp and "web.test" not in watcher.rejected
    watcher.on_events(WatchBatch(9, (Event("delete", kv("web.test", "", 9)),)))
    assert watcher.valid() == {} and watcher.rejected_total == 3


def test_tls_files_hold_exactly_the_target(tmp_path: Path) -> None:
    from reloader.certs import TlsFiles, TlsTarget
    from reloader.model import RenderSettings

    settings = RenderSettings(state_dir=tmp_path)
    files = TlsFiles(settings, tmp_path / "admin.sock")
    files.ensure_default()
    default = settings.default_cert.read_text()
    files.ensure_default()
    assert settings.default_cert.read_text() == default, "made once, then kept"
    assert settings.default_cert.stat().st_mode & 0o777 == 0o600
    files.write(TlsTarget({"a": "A\n", "b": "B\n"}, {"a.test": "redirect"}, {"a.test": 60}))
    assert settings.crt_list.read_text().splitlines() == [
        str(files.cert_file("a")),
        str(files.cert_file("b")),
    ]
    assert settings.https_map.read_text() == "a.test redirect\n"
    assert settings.hsts_map.read_text() == "a.test 60\n"
    assert files.cert_file("a").stat().st_mode & 0o777 == 0o600
    files.write(TlsTarget({"b": "B2\n"}, {}, {}))
    assert not files.cert_file("a").exists() and files.cert_file("b").read_text() == "B2\n"
    assert settings.crt_list.read_text() == f"{files.cert_file('b')}\n"
    assert settings.https_map.read_text() == ""
