"""The etcd key layout (a contract shared with every component, docs/REGISTRY.md).

{prefix}/services/{service}/instances/{instance}   Instance JSON, leased
{prefix}/services/{service}/spec                   ServiceSpec JSON, permanent
{prefix}/reloaders/{id}                            ReloaderStatus JSON, leased
{prefix}/certs/{name}                              PEM chain + key, permanent (reloaders only)
{prefix}/apps/{app}/config                         AppConfig JSON, permanent (deployer)
{prefix}/apps/{app}/deploys/{id}                   a deploy's record, the last 50 kept
{prefix}/apps/{app}/lock                           the running deploy's id, leased
{prefix}/owners/{service}                          the app the service belongs to (deployer)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_PREFIX = "/fluster"


def normalise_prefix(prefix: str) -> str:
    """`fluster`, `/fluster/` and `/fluster` all mean `/fluster`."""
    return "/" + prefix.strip("/") if prefix.strip("/") else ""


def services_prefix(prefix: str) -> str:
    return f"{prefix}/services/"


def service_prefix(prefix: str, service: str) -> str:
    return f"{prefix}/services/{service}/"


def instances_prefix(prefix: str, service: str) -> str:
    return f"{prefix}/services/{service}/instances/"


def instance_key(prefix: str, service: str, instance: str) -> str:
    return instances_prefix(prefix, service) + instance


def spec_key(prefix: str, service: str) -> str:
    return f"{prefix}/services/{service}/spec"


def reloaders_prefix(prefix: str) -> str:
    return f"{prefix}/reloaders/"


def reloader_key(prefix: str, reloader_id: str) -> str:
    return f"{prefix}/reloaders/{reloader_id}"


def counters_prefix(prefix: str, service: str) -> str:
    """Where the edges publish a service's per-version counters under canary analysis."""
    return f"{prefix}/counters/{service}/"


def counters_key(prefix: str, service: str, reloader_id: str) -> str:
    return f"{prefix}/counters/{service}/{reloader_id}"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    service: str
    kind: Literal["instance", "spec"]
    instance: str = ""


def parse_key(prefix: str, key: str) -> ParsedKey | None:
    """Split a key under `services/`; None for keys outside the layout.

    Names are not validated here: the catalog validates them with the value so that
    a bad name is reported like any other bad record.
    """
    root = services_prefix(prefix)
    if not key.startswith(root):
        return None
    parts = key[len(root) :].split("/")
    if len(parts) == 2 and parts[1] == "spec":
        return ParsedKey(parts[0], "spec")
    if len(parts) == 3 and parts[1] == "instances":
        return ParsedKey(parts[0], "instance", parts[2])
    return None


def certs_prefix(prefix: str) -> str:
    return f"{prefix}/certs/"


def cert_key(prefix: str, name: str) -> str:
    return f"{prefix}/certs/{name}"


def acme_lock_key(prefix: str) -> str:
    """Held (under its lease) by the one edge ordering certificates."""
    return f"{prefix}/acme/lock"


def acme_challenge_key(prefix: str, token: str) -> str:
    return f"{prefix}/acme/challenges/{token}"


def apps_prefix(prefix: str) -> str:
    return f"{prefix}/apps/"


def app_config_key(prefix: str, app: str) -> str:
    return f"{prefix}/apps/{app}/config"


def deploys_prefix(prefix: str, app: str) -> str:
    return f"{prefix}/apps/{app}/deploys/"


def deploy_key(prefix: str, app: str, deploy_id: str) -> str:
    return f"{prefix}/apps/{app}/deploys/{deploy_id}"


def app_lock_key(prefix: str, app: str) -> str:
    return f"{prefix}/apps/{app}/lock"


def owner_key(prefix: str, service: str) -> str:
    """The app a service belongs to: only that app's containers may register in it."""
    return f"{prefix}/owners/{service}"
