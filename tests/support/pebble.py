"""Pebble (the ACME test CA packaged by Debian) and its DNS stub, on loopback only.

`pebble-challtestsrv` answers every A query with 127.0.0.1 (and no AAAA), so the CA's
HTTP-01 validation of any name reaches the HAProxy under test on `http_port`: nothing
leaves the machine and no real resolver is asked. Pebble's nonce rejection is turned
off (PEBBLE_WFE_NONCEREJECT=0) and its validation delay too (PEBBLE_VA_NOSLEEP=1), so
runs are deterministic and quick; everything else is Pebble's real ACME server.

Their listening ports are written into a config and argv, so they come from `free_port()`.
Pebble exits when it cannot bind; pebble-challtestsrv logs "bind: address already in use"
for its DNS port and keeps running without it. Either log saying so starts both again on
fresh ports (testbed/ports.py). `http_port` is not theirs: it is the edge Pebble validates
through, given by the test.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from pathlib import Path

from fluster.certs import self_signed
from testbed.ports import lost_a_port, start_on_fresh_ports
from testbed.process import wait_or_kill
from tests.support.etcd import GaveUp, free_port, wait_for


class Pebble:
    def __init__(self, root: Path, http_port: int) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._pick_ports()
        self.http_port = http_port
        cert, key = self_signed(["localhost"], days=2)
        self.ca_file = root / "pebble-tls.pem"
        self.ca_file.write_text(cert)
        (root / "pebble-tls-key.pem").write_text(key)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._log_start: dict[str, int] = {}

    def _pick_ports(self) -> None:
        self.port, self.dns_port = free_port(), free_port()
        self.management_port, self.dns_management_port = free_port(), free_port()

    @property
    def directory(self) -> str:
        return f"https://localhost:{self.port}/dir"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self._log_start[name] = log.tell()
        self.procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        )
        log.close()

    def start(self) -> Pebble:
        return start_on_fresh_ports(
            self._start, self._lost_a_port, self._on_fresh_ports, f"pebble (logs in {self.root})"
        )

    def _on_fresh_ports(self) -> None:
        self.stop()
        self.procs.clear()
        self._pick_ports()

    def _lost_a_port(self) -> bool:
        return any(lost_a_port(self._log(name)) for name in self._log_start)

    def _log(self, name: str) -> str:
        """What `name` logged since its last start."""
        with open(self.root / f"{name}.log", "rb") as log:
            log.seek(self._log_start[name])
            return log.read().decode(errors="replace")

    def _start(self) -> Pebble:
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.ca_file),
                "privateKey": str(self.root / "pebble-tls-key.pem"),
                "httpPort": self.http_port,
                "tlsPort": free_port(),  # where TLS-ALPN-01 validates: dialled, not bound
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
                f"127.0.0.1:{self.dns_management_port}",
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
        if self._lost_a_port():
            raise GaveUp(f"pebble or challtestsrv lost a port: see {self.root}")
        for proc in self.procs:
            if proc.poll() is not None:
                raise GaveUp(f"{proc.args[0]} exited {proc.returncode}: see {self.root}")
        out = subprocess.run(
            ["curl", "-s", "--cacert", str(self.ca_file), self.directory],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return "newOrder" in out.stdout and self._dns_answers()

    def _dns_answers(self) -> bool:
        """challtestsrv answers an A query on its DNS port, over UDP and over TCP (a
        process that took either port would not)."""
        name = b"".join(bytes([len(p)]) + p for p in b"probe.test".split(b".")) + b"\0"
        query = struct.pack(">HHHHHH", 0x4650, 0x0100, 1, 0, 0, 0) + name + b"\0\1\0\1"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(1)
                udp.sendto(query, ("127.0.0.1", self.dns_port))
                if udp.recv(512)[:2] != query[:2]:
                    return False
            with socket.create_connection(("127.0.0.1", self.dns_port), timeout=1) as tcp:
                tcp.sendall(struct.pack(">H", len(query)) + query)
                return tcp.recv(512)[2:4] == query[:2]
        except OSError:
            return False

    def log(self) -> str:
        return (self.root / "pebble.log").read_text(errors="replace")

    def validate_through(self, http_port: int) -> None:
        """Validate HTTP-01 through `http_port` from now on (the edge it was given started
        on a fresh port): Pebble again, on its own ports, so its directory stays."""
        if http_port == self.http_port:
            return
        self.stop()
        self.procs.clear()
        self.http_port = http_port
        self._start()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                wait_or_kill(proc, 10)
