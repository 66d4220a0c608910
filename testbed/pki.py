"""A throwaway certificate authority made with the openssl CLI, for mutual-TLS tests."""

from __future__ import annotations

import subprocess
from pathlib import Path


class Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certs by name.

    etcd maps a client certificate's CN to an etcd user, so `client_cert("sidekick-web")`
    is also how RBAC tests pick an identity.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca, self.ca_key = root / "ca.pem", root / "ca-key.pem"
        self._openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=fluster-test-ca",
            "-keyout",
            self.ca_key,
            "-out",
            self.ca,
        )
        self.server_cert, self.server_key = self._issue("server", server=True)

    def _openssl(self, *args: object) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    def _issue(self, name: str, server: bool = False, cn: bool = True) -> tuple[Path, Path]:
        key, csr, cert = (
            self.root / f"{name}-key.pem",
            self.root / f"{name}.csr",
            self.root / f"{name}.pem",
        )
        if cert.exists():
            return cert, key
        ext = self.root / f"{name}.ext"
        usage = "serverAuth,clientAuth" if server else "clientAuth"
        ext.write_text(f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
        self._openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}" if cn else "/O=fluster-test",
            "-keyout",
            key,
            "-out",
            csr,
        )
        self._openssl(
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            self.ca,
            "-CAkey",
            self.ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            cert,
        )
        return cert, key

    def client_cert(self, name: str) -> Path:
        return self._issue(name)[0]

    def client_key(self, name: str) -> Path:
        return self._issue(name)[1]

    def client_pair_without_cn(self, name: str) -> tuple[Path, Path]:
        """A client certificate with no CommonName (SANs only): what etcd's JSON gateway
        accepts under --client-cert-auth; the identity then comes from a password user."""
        return self._issue(f"{name}-no-cn", cn=False)
