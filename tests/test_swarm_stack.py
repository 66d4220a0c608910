"""docker-stack.yml, checked the way Docker reads it.

`docker stack config` arrived after Debian's docker.io 20.10, so the file goes through
`docker-compose config` (1.29, which validates Compose v3 with its `deploy:` keys and
interpolates variables as `docker stack deploy` does). Its output is YAML; the project's
virtualenv has no YAML parser, so it is read with the Python docker-compose itself runs
on, which always has one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from testbed.docker import BASE_IMAGE, DOCKER
from tests.support.etcd import free_port, wait_for
from tests.support.swarm import PrivateSwarm

REPO = Path(__file__).resolve().parents[1]
STACK = REPO / "docker-stack.yml"
STACK_IMAGES = ("fluster/haproxy:dev", "fluster/sidekick:dev", "fluster/etcd:dev")
MEMBERS = "10.0.0.11:2379,10.0.0.12:2379,10.0.0.13:2379"


def compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return path


def stack_config(**env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "FLUSTER_", "COMPOSE_"))
    }
    return subprocess.run(
        [compose(), "-f", str(STACK), "config"],
        capture_output=True,
        text=True,
        env={**environ, **env},
        cwd=REPO,
        timeout=60,
    )


def parsed(**env: str) -> dict[str, Any]:
    result = stack_config(**env)
    assert result.returncode == 0, result.stderr
    python = Path(compose()).read_text().splitlines()[0].removeprefix("#!").split()
    to_json = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"
    out = subprocess.run(
        [*python, "-c", to_json], input=result.stdout, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def test_stack_file_is_valid_and_places_each_role() -> None:
    services = parsed(ETCD_ENDPOINTS=MEMBERS)["services"]

    sidekick = services["sidekick"]
    assert sidekick["deploy"]["mode"] == "global"
    assert sidekick["environment"]["SIDEKICK_ALL"] == "1"
    assert sidekick["environment"]["ETCD_ENDPOINTS"] == MEMBERS
    assert {"type": "bind", "source": "/var/run/docker.sock", "target": "/var/run/docker.sock"} in (
        sidekick["volumes"]
    )

    edge = services["edge"]
    assert edge["deploy"]["mode"] == "global"
    assert edge["deploy"]["placement"]["constraints"] == ["node.labels.fluster.edge == true"]
    assert edge["ports"], "the edge publishes its HTTP port"
    # Host mode on every port: Swarm's ingress mesh would hide client addresses and add a
    # hop; each edge node's port 80 is its own HAProxy.
    assert {p["mode"] for p in edge["ports"]} == {"host"}
    assert {(p["target"], p["published"]) for p in edge["ports"]} == {(80, 80), (443, 443)}
    assert edge["environment"]["ETCD_ENDPOINTS"] == MEMBERS

    # etcd runs outside the swarm unless asked for.
    assert services["etcd"]["deploy"]["replicas"] == 0


def test_stack_file_edge_ports_can_move() -> None:
    edge = parsed(ETCD_ENDPOINTS=MEMBERS, FLUSTER_HTTP_PORT="8080", FLUSTER_HTTPS_PORT="8443")[
        "services"
    ]["edge"]
    assert {(p["target"], p["published"]) for p in edge["ports"]} == {(80, 8080), (443, 8443)}


def test_stack_file_can_run_one_etcd_for_trying() -> None:
    services = parsed(ETCD_ENDPOINTS="etcd:2379", FLUSTER_ETCD_REPLICAS="1")["services"]
    assert services["etcd"]["deploy"]["replicas"] == 1
    assert services["sidekick"]["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"


def test_stack_file_refuses_to_guess_etcd() -> None:
    result = stack_config()
    assert result.returncode != 0
    assert "ETCD_ENDPOINTS" in result.stderr


def test_stack_file_images_are_the_ones_the_project_builds() -> None:
    services = parsed(ETCD_ENDPOINTS=MEMBERS, FLUSTER_IMAGES="10.0.0.5:5000/fluster")["services"]
    built = (REPO / "scripts/build-images.sh").read_text()
    for name, role in (("sidekick", "sidekick"), ("edge", "haproxy"), ("etcd", "etcd")):
        assert services[name]["image"] == f"10.0.0.5:5000/fluster/{role}:dev"
        assert f"fluster/{role}" in built


def test_stack_file_sets_only_settings_the_components_read() -> None:
    """A misspelt variable would be silently ignored by the component; every fluster
    setting named in the stack must occur in the code that reads it."""
    services = parsed(ETCD_ENDPOINTS=MEMBERS)["services"]
    code = "".join(
        path.read_text()
        for pkg in ("fluster", "sidekick", "reloader")
        for path in (REPO / pkg).rglob("*.py")
    )
    for name in ("sidekick", "edge"):
        for key in services[name]["environment"]:
            assert re.match(r"(ETCD|FLUSTER|SIDEKICK|RELOADER)_", key), key
            assert f'"{key}"' in code, f"{name}: {key} is read by no component"


# -- the stack deployed for real -----------------------------------------------------


def test_stack_file_reaches_etcd_by_dns_round_robin() -> None:
    services = parsed(ETCD_ENDPOINTS="etcd:2379", FLUSTER_ETCD_REPLICAS="1")["services"]
    assert services["etcd"]["deploy"]["endpoint_mode"] == "dnsrr"


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_docker_stack_deploy_serves_an_app_service_through_the_edge(
    private_swarm: PrivateSwarm, project_images: None
) -> None:
    """`docker stack deploy -c docker-stack.yml` as DEPLOYING.md's quick try says, on a
    one-node swarm of the test's own (its own dockerd: never the machine's engine):
    the stack's own etcd (one member, reached by DNS round robin: this kernel has no
    IPVS, so a Swarm virtual IP would reach nothing), the sidekick and the edge; then an
    app service labelled as DEPLOYING.md shows is served through the edge's port."""
    for image in STACK_IMAGES:
        private_swarm.copy_image(image)
    node = private_swarm.docker("info", "--format", "{{.Swarm.NodeID}}")
    private_swarm.docker("node", "update", "--label-add", "fluster.edge=true", node)
    # Edges in containers reach the node's published ports at an address of the host's
    # that is not loopback: the gateway of Swarm's docker_gwbridge on this node.
    shown = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "dev", private_swarm.gwbridge],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout  # fmt: skip
    gateway = shown.split(" inet ")[1].split("/")[0]
    http_port, https_port = free_port(), free_port()
    name = f"fl{uuid.uuid4().hex[:6]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "FLUSTER_"))},
        "DOCKER_HOST": private_swarm.host,
        "ETCD_ENDPOINTS": "etcd:2379",
        "FLUSTER_ETCD_REPLICAS": "1",
        "FLUSTER_HTTP_PORT": str(http_port),
        "FLUSTER_HTTPS_PORT": str(https_port),
        "DOCKER_SOCKET": str(private_swarm.sock),
        "SIDEKICK_ADVERTISE_IP": gateway,
    }
    deployed = subprocess.run(
        [DOCKER or "docker", "stack", "deploy", "-c", str(STACK), name],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    private_swarm.docker(
        "service", "create", "--detach", "--name", f"{name}-web", "--replicas", "2",
        "--endpoint-mode", "dnsrr", "--publish", "mode=host,target=8000",
        "--container-label", "fluster.service=web", "--container-label", "fluster.port=8000",
        "--container-label", "fluster.check=http:/",
        BASE_IMAGE, "python3", "-m", "http.server", "8000", timeout=60,
    )  # fmt: skip

    def served() -> bool:
        try:
            with urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{http_port}/", headers={"Host": "web.localhost"}
                ),
                timeout=3,
            ) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    try:
        wait_for(
            served, timeout=90, interval=1, what="the app service served through the stack's edge"
        )
    except AssertionError:
        for service in ("etcd", "sidekick", "edge"):
            print(
                private_swarm.docker(
                    "service", "ps", "--no-trunc", f"{name}_{service}", check=False
                )
            )
            print(
                private_swarm.docker(
                    "service", "logs", "--tail", "30", f"{name}_{service}", check=False
                )
            )
        raise
    # Both tasks are in rotation: the edge sees two servers of web, and both answer.
    answers = 0
    for _ in range(10):
        answers += served()
    assert answers == 10
