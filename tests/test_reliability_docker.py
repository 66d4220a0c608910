"""R6: dockerd restarted under the host agent, seen from the edge.

`tests/test_sidekick_docker.py::test_dockerd_restart_resyncs_without_zombies` checks the
registry side (a container that died while dockerd was away is deregistered at resync,
one with a restart policy is registered again). This adds what the edge sees: through
the restart, and after it, HAProxy's servers equal etcd's records, no record is stale
(every one names a running container, at its address) and none is duplicated (one
record per container, one container per address), including a container started just
after dockerd returns.
"""

from __future__ import annotations

import collections
import os
import signal
import time
import uuid
from collections.abc import Callable

import pytest

from tests.support.docker import Engine, PrivateDockerd
from tests.support.etcd import Etcd, wait_for
from tests.support.faults import service_servers
from tests.support.haproxy import ReloaderProcess
from tests.support.sidekick import Sidekicks
from tests.support.waiting import Compared

pytestmark = [pytest.mark.slow, pytest.mark.docker]


def records(sidekicks: Sidekicks, service: str) -> dict[str, str]:
    return {name: inst.address for name, inst in sidekicks.instances(service).items()}


def served(reloader: ReloaderProcess, service: str) -> set[str]:
    servers = service_servers(reloader.state_dir, service)
    return {f"{host}:{port}" for host, port in servers}


@pytest.mark.timeout(240)
def test_r6_dockerd_restart_under_the_host_agent_leaves_no_stale_or_duplicate_server(
    sidekicks: Sidekicks,
    private_dockerd: PrivateDockerd,
    start_reloader: Callable[..., ReloaderProcess],
    etcd: Etcd,
) -> None:
    tag = uuid.uuid4().hex[:8]
    service, node = f"r{tag}", f"n{tag}"
    engine = Engine(private_dockerd.host)

    def run(*extra: str) -> tuple[str, int]:
        """A container of the service on the host network: (its id, its port)."""
        return engine.run_host_app(
            lambda port: {"fluster.service": service, "fluster.port": str(port)}, extra=extra
        )

    try:
        # No restart policy: its process dies while dockerd is away.
        gone, gone_port = run()
        started = [run("--restart", "always") for _ in range(2)]
        kept = [cid for cid, _ in started]
        ports = [gone_port, *(port for _, port in started)]
        sidekicks.start(
            "--all", "--node", node, "--docker-host", private_dockerd.host,
            "--advertise-ip", "127.0.0.1", "--drain-seconds", "0.5",
            "--ttl", "2", "--check-interval", "0.2",
        )  # fmt: skip
        reloader = start_reloader()
        want = {
            f"{node}-{c[:12]}": f"127.0.0.1:{p}"
            for c, p in zip([gone, *kept], ports[:3], strict=True)
        }
        wait_for(lambda: records(sidekicks, service) == want, timeout=30, what="registered")
        wait_for(lambda: served(reloader, service) == set(want.values()), what="HAProxy")

        pid = int(engine.docker("inspect", "-f", "{{.State.Pid}}", gone))
        private_dockerd.kill()
        os.kill(pid, signal.SIGKILL)
        time.sleep(3)  # past the TTL: nothing is lost while dockerd is away
        assert records(sidekicks, service) == want
        assert served(reloader, service) == set(want.values())

        private_dockerd.start()
        for cid in kept:
            wait_for(lambda cid=cid: engine.running(cid), timeout=30, what="restarted")
        # Its port picked now, not at the start: an ephemeral port left free for 10 s on a
        # busy machine may be in use by then (and a port taken at the bind is retried).
        fresh, fresh_port = run()  # started as soon as dockerd is back
        want = {f"{node}-{c[:12]}": f"127.0.0.1:{p}" for c, p in zip(kept, ports[1:3], strict=True)}
        want[f"{node}-{fresh[:12]}"] = f"127.0.0.1:{fresh_port}"
        wait_for(
            lambda: Compared("etcd records", records(sidekicks, service), want),
            timeout=30,
            what="resynced registry",
        )
        wait_for(
            lambda: Compared("HAProxy servers", served(reloader, service), set(want.values())),
            timeout=15,
            what="HAProxy equal to etcd",
        )
        time.sleep(3)  # and it stays so (no late zombie, no second record)
        now = records(sidekicks, service)
        assert now == want
        addresses = collections.Counter(now.values())
        assert max(addresses.values()) == 1, addresses
        assert served(reloader, service) == set(now.values())
        for name, address in now.items():
            status, body = reloader.get(f"{service}.localhost")
            assert status == 200, (name, address, body)
    finally:
        engine.cleanup()
