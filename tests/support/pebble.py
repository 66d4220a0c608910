"""Pebble (the ACME test CA packaged by Debian) and its DNS stub, on loopback only.

`pebble-challtestsrv` answers every A query with 127.0.0.1 (and no AAAA), so the CA's
HTTP-01 validation of any name reaches the HAProxy under test on `http_port`: nothing
leaves the machine and no real resolver is asked. Pebble's nonce rejection is turned
off (PEBBLE_WFE_NONCEREJECT=0) and its validation delay too (PEBBLE_VA_NOSLEEP=1), so
runs are deterministic and quick; everything else is Pebble's real ACME server.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from fluster.certs import self_signed
from testbed.process import wait_or_kill
from tests.support.etcd import free_port, wait_for


class Pebble:
    def __init__(self, root: Path, http_port: int) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port, self.dns_port = free_port(), free_port()
        self.http_port = http_port
        cert, key = self_signed(["localhost"], days=2)
        self.ca_file = root / "pebble-tls.pem"
        self.ca_file.write_text(cert)
        (root / "pebble-tls-key.pem").write_text(key)
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def directory(self) -> str:
        return f"https://localhost:{self.port}/dir"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        )
        log.close()

    def start(self) -> Pebble:
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{free_port()}",
                "certificate": str(self.ca_file),
                "privateKey": str(self.root / "pebble-tls-key.pem"),
                "httpPort": self.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (self.root / "pebble.json").write_text(json.dumps(config))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        self._spawn(
            "challtestsrv",
            [
                "pebble-challtestsrv",
                "-dns01",
                f"127.0.0.1:{self.dns_port}",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"127.0.0.1:{free_port()}",
            ],
            env,
        )
        self._spawn(
            "pebble",
            [
                "pebble",
                "-config",
                str(self.root / "pebble.json"),
                "-dnsserver",
                f"127.0.0.1:{self.dns_port}",
            ],
            env,
        )
        wait_for(self._up, timeout=20, what=f"pebble up (logs in {self.root})")
        return self

    def _up(self) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args[0]} exited: see {self.root}")
        out = subprocess.run(
            ["curl", "-s", "--cacert", str(self.ca_file), self.directory],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return "newOrder" in out.stdout

    def log(self) -> str:
        return (self.root / "pebble.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                wait_or_kill(proc, 10)
