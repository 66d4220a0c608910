"""What the Swarm scheduler asks Swarm for (`deployer.swarm.service_spec`): pure, no I/O."""

from __future__ import annotations

from deployer.records import AppConfig
from deployer.scheduler import Release
from deployer.swarm import service_name, service_spec


def test_a_version_is_one_service_named_app_sha7() -> None:
    assert service_name("web", "3f2a9c1d0e4b") == "web-3f2a9c1"
    # An image tag as the version stays whole (two tags must not share a name), made safe.
    assert service_name("web", "release-1") == "web-release-1"
    assert service_name("web", "v1+build:2") == "web-v1-build-2"
    assert len(service_name("a" * 63, "3f2a9c1d0e4b")) <= 63


def test_service_spec_labels_containers_for_the_sidekick_and_publishes_in_host_mode() -> None:
    config = AppConfig(service="shop", replicas=3, port=8080, check="http:/ready", env={"A": "1"})
    release = Release("web", "3f2a9c1d0e4b", "127.0.0.1:5000/web:3f2a9c1d0e4b", "d1")
    spec = service_spec(release, config, stop_grace=7)

    assert spec["Name"] == "web-3f2a9c1"
    assert spec["Mode"] == {"Replicated": {"Replicas": 3}}
    container = spec["TaskTemplate"]["ContainerSpec"]
    assert container["Image"] == "127.0.0.1:5000/web:3f2a9c1d0e4b"  # every node pulls it
    # The labels the sidekick host agent reads go on the containers, not the service.
    assert container["Labels"] == {
        "fluster.app": "web",
        "fluster.version": "3f2a9c1d0e4b",
        "fluster.service": "shop",
        "fluster.port": "8080",
        "fluster.check": "http:/ready",
        "fluster.deploy": "d1",
    }
    assert spec["Labels"]["fluster.app"] == "web"  # how the scheduler finds its services
    assert "A=1" in container["Env"] and "PORT=8080" in container["Env"]
    assert container["StopGracePeriod"] == 7 * 10**9
    assert spec["TaskTemplate"]["RestartPolicy"]["Condition"] == "any"
    # Host mode, no fixed host port (Docker picks one per task), no ingress mesh, no VIP.
    assert spec["EndpointSpec"] == {
        "Mode": "dnsrr",
        "Ports": [{"Protocol": "tcp", "TargetPort": 8080, "PublishMode": "host"}],
    }


def test_service_spec_carries_the_command_limits_and_the_apps_own_volumes() -> None:
    config = AppConfig(service="web", memory="128m", cpus=0.5, volumes=("data:/data",))
    release = Release("web", "3f2a9c1d0e4b", "r/web:3f2a9c1d0e4b", "d1", "gunicorn app")
    spec = service_spec(release, config, stop_grace=7)
    container = spec["TaskTemplate"]["ContainerSpec"]
    assert container["Command"] == ["/bin/sh", "-c", "gunicorn app"]
    assert container["Mounts"] == [
        {"Type": "volume", "Source": "web-data", "Target": "/data", "ReadOnly": False}
    ]
    assert spec["TaskTemplate"]["Resources"] == {
        "Limits": {"MemoryBytes": 128 << 20, "NanoCPUs": 500_000_000}
    }
