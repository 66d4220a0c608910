"""etcd with mutual TLS, client-certificate identities and least-privilege roles.

The layout every fluster deployment should copy (docs/OPERATIONS.md walks through the
same steps with etcdctl): each component authenticates with a client certificate whose
CN is its etcd user name, and holds only the permissions its job needs.

- `sidekick-{svc}` (role `fluster-sidekick-{svc}`): read `{prefix}/services/{svc}/`
  (its spec, and the watch that notices its record deleted), readwrite
  `{prefix}/services/{svc}/instances/`;
- `reloader` (role `fluster-reloader`): read `{prefix}/services/` and `{prefix}/certs/`
  (TLS private keys: no sidekick ever reads them), readwrite `{prefix}/reloaders/` and
  `{prefix}/counters/`;
- `fluster-operator` (role `fluster-operator`): readwrite `{prefix}/services/` and
  `{prefix}/certs/`, read `{prefix}/reloaders/` (what `fluster promote` waits on);
- `fluster-deployer` (role `fluster-deployer`): readwrite `{prefix}/apps/`,
  `{prefix}/owners/` and `{prefix}/services/`, read `{prefix}/reloaders/`: app configs,
  deploy records and locks, which app owns a service, promotions;
- `root`: everything, used only by the test to set up.

A sidekick cannot rewrite its service's spec (that would let a compromised host
promote or retire versions) nor touch another service; a reloader cannot register
anything. `reloader-pw` is the reloader role again behind a password instead of a
certificate CN, so tests can check that a password never reaches a log line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fluster.store import EtcdSettings
from testbed.pki import Pki
from tests.support.etcd import Etcd

PREFIX = "/fluster"
RBAC_SERVICES = ("web", "api")
RELOADER_PASSWORD = "s3cret-reloader-Pa55word"  # a throwaway, for the log checks


def sidekick_identity(service: str) -> str:
    return f"sidekick-{service}"


def rbac_commands(prefix: str, services: Iterable[str]) -> list[tuple[str, ...]]:
    """The etcdctl argument lists that build the roles above, in order (auth enable last)."""
    svc_root = f"{prefix}/services/"
    certs_root = f"{prefix}/certs/"
    cmds: list[tuple[str, ...]] = [("user", "add", "root", "--no-password")]
    for service in services:
        role, user = f"fluster-sidekick-{service}", sidekick_identity(service)
        cmds += [
            ("role", "add", role),
            ("role", "grant-permission", "--prefix=true", role, "read", f"{svc_root}{service}/"),
            (
                "role",
                "grant-permission",
                "--prefix=true",
                role,
                "readwrite",
                f"{svc_root}{service}/instances/",
            ),
            ("user", "add", user, "--no-password"),
            ("user", "grant-role", user, role),
        ]
    cmds += [
        ("role", "add", "fluster-reloader"),
        ("role", "grant-permission", "--prefix=true", "fluster-reloader", "read", svc_root),
        ("role", "grant-permission", "--prefix=true", "fluster-reloader", "read", certs_root),
        (
            "role",
            "grant-permission",
            "--prefix=true",
            "fluster-reloader",
            "readwrite",
            f"{prefix}/reloaders/",
        ),
        (
            "role",
            "grant-permission",
            "--prefix=true",
            "fluster-reloader",
            "readwrite",
            f"{prefix}/counters/",
        ),
        ("user", "add", "reloader", "--no-password"),
        ("user", "grant-role", "reloader", "fluster-reloader"),
        ("user", "add", "reloader-pw", "--new-user-password", RELOADER_PASSWORD),
        ("user", "grant-role", "reloader-pw", "fluster-reloader"),
        ("role", "add", "fluster-operator"),
        ("role", "grant-permission", "--prefix=true", "fluster-operator", "readwrite", svc_root),
        (
            "role",
            "grant-permission",
            "--prefix=true",
            "fluster-operator",
            "readwrite",
            certs_root,
        ),
        (
            "role",
            "grant-permission",
            "--prefix=true",
            "fluster-operator",
            "read",
            f"{prefix}/reloaders/",
        ),
        (
            "role",
            "grant-permission",
            "--prefix=true",
            "fluster-operator",
            "read",
            f"{prefix}/counters/",
        ),
        ("user", "add", "fluster-operator", "--no-password"),
        ("user", "grant-role", "fluster-operator", "fluster-operator"),
        ("role", "add", "fluster-deployer"),
        *(
            (
                "role",
                "grant-permission",
                "--prefix=true",
                "fluster-deployer",
                "readwrite",
                f"{prefix}/{part}/",
            )
            for part in ("apps", "owners", "services")
        ),
        (
            "role",
            "grant-permission",
            "--prefix=true",
            "fluster-deployer",
            "read",
            f"{prefix}/reloaders/",
        ),
        (
            "role",
            "grant-permission",
            "--prefix=true",
            "fluster-deployer",
            "read",
            f"{prefix}/counters/",
        ),
        ("user", "add", "fluster-deployer", "--no-password"),
        ("user", "grant-role", "fluster-deployer", "fluster-deployer"),
        ("auth", "enable"),
    ]
    return cmds


@dataclass
class RbacEtcd:
    """A TLS etcd with RBAC on, and the way each identity connects to it."""

    etcd: Etcd
    pki: Pki
    prefix: str = PREFIX

    @property
    def https_endpoints(self) -> tuple[str, ...]:
        return tuple(f"https://{e}" for e in self.etcd.endpoint_list)

    def settings(self, identity: str, **extra: object) -> EtcdSettings:
        """Store settings for a certificate identity (CN = etcd user name)."""
        return EtcdSettings(
            endpoints=self.https_endpoints,
            cacert=self.pki.ca,
            cert=self.pki.client_cert(identity),
            key=self.pki.client_key(identity),
            timeout=3.0,
            **extra,  # type: ignore[arg-type]
        )

    def env(self, identity: str, *, password: str | None = None) -> dict[str, str]:
        """The environment a component process gets (the command-line contract)."""
        env = {
            **os.environ,
            "ETCD_ENDPOINTS": ",".join(self.https_endpoints),
            "ETCD_CACERT": str(self.pki.ca),
            "ETCD_CERT": str(self.pki.client_cert(identity)),
            "ETCD_KEY": str(self.pki.client_key(identity)),
            "FLUSTER_PREFIX": self.prefix,
        }
        if password is not None:
            env["ETCD_USER"], env["ETCD_PASSWORD"] = identity, password
        return env

    def secrets(self) -> list[str]:
        """Strings that must never appear in a log line: password and key material."""
        out = [RELOADER_PASSWORD]
        for key in self.pki.root.glob("*-key.pem"):
            lines = [ln for ln in key.read_text().splitlines() if ln and "-----" not in ln]
            out += [ln for ln in lines if len(ln) >= 32]
        return out


TOKEN_RE = re.compile(r"\b[A-Za-z]{16}\.\d+\b")  # etcd's "simple" auth token format


def assert_no_secrets(rbac: RbacEtcd, logs: dict[str, str]) -> None:
    """No password, private key line or auth token in any line a component printed."""
    assert logs and all(logs.values()), "nothing captured"
    secrets = rbac.secrets()
    for name, text in logs.items():
        for line in text.splitlines():
            for secret in secrets:
                assert secret not in line, f"{name} logged a secret: {line[:200]}"
            assert "PRIVATE KEY" not in line, f"{name}: {line[:200]}"
            assert not TOKEN_RE.search(line), f"{name} logged what looks like a token: {line}"


def component_env(rbac: RbacEtcd, identity: str, **extra: str) -> dict[str, str]:
    """Only the contract's etcd variables of `rbac.env` (to add to a process's env)."""
    env = rbac.env(identity)
    wanted = ("ETCD_ENDPOINTS", "ETCD_CACERT", "ETCD_CERT", "ETCD_KEY", "FLUSTER_PREFIX")
    return {**{k: env[k] for k in wanted}, **extra}


def start_rbac_etcd(
    root: Path, pki: Pki, size: int = 1, services: Iterable[str] = RBAC_SERVICES
) -> RbacEtcd:
    etcd = Etcd(root / "etcd", size=size, pki=pki).start()
    for args in rbac_commands(PREFIX, services):
        etcd.ctl(*args, check=True)
    return RbacEtcd(etcd, pki)


@pytest.fixture(scope="session")
def rbac_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One CA and its certificates for the whole run: making RSA keys is the slow part."""
    return Pki(tmp_path_factory.mktemp("rbac-pki"))


@pytest.fixture
def etcd_rbac(tmp_path: Path, rbac_pki: Pki) -> Iterator[RbacEtcd]:
    """A fresh single TLS member with the roles above; root is only for the test itself."""
    cluster = start_rbac_etcd(tmp_path, rbac_pki)
    try:
        yield cluster
    finally:
        cluster.etcd.stop()
