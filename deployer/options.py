"""The options of `fluster app|deploy|deploys|git-shell` (and of `rollback` for an app).

The deployer declares them; this module imports the core only (no Docker client, no
pipeline), so `fluster --help` and argument checking stay light. `fluster.cli`, which
sits above the core and the deployer, lists them and runs the commands through
`deployer.cli`, imported only when one of them runs.
"""

from __future__ import annotations

from typing import Any

from fluster.ops import KEEP_OLD_TEXT, WAIT_TIMEOUT_S
from fluster.options import canary_steps, duration_seconds, latency, percent
from fluster.records import RecordError, validate_service_name
from fluster.settings import Option, integer, number, one_of, switch


def _app(text: Any) -> str:
    try:
        return validate_service_name(text)
    except RecordError as exc:
        raise ValueError(exc.reason) from None


APP: Option[str] = Option("app", None, "app name", "", _app, kind="positional", metavar="APP")
# App config fields: None means "not given"; AppConfig validates what is.
SERVICE: Option[str | None] = Option(
    "--service", None, "deploy as this service", None, _app, shown="the app's name"
)
REPLICAS: Option[int | None] = Option(
    "--replicas", None, "instances per version", None, integer(1, 100), shown="2"
)
PORT: Option[int | None] = Option(
    "--port", None, "the port the app listens on", None, integer(1, 65535), shown="8000"
)
CHECK: Option[str | None] = Option(
    "--check", None, "health check: http:/PATH, tcp, docker or none", None, shown="http:/health"
)
ENV: Option[list[str] | None] = Option(
    "--env", None, "set a variable (repeatable)", None, list, kind="list", metavar="NAME=VALUE"
)
UNSET_ENV: Option[list[str] | None] = Option(
    "--unset-env", None, "remove a variable (repeatable)", None, list, kind="list", metavar="NAME"
)
SECRET: Option[list[str] | None] = Option(
    "--secret",
    None,
    "set a variable never shown by any listing (repeatable); NAME alone takes the value "
    "from this command's environment, keeping it out of ps and shell history",
    None,
    list,
    kind="list",
    metavar="NAME[=VALUE]",
)
UNSET_SECRET: Option[list[str] | None] = Option(
    "--unset-secret", None, "remove a secret (repeatable)", None, list, kind="list", metavar="NAME"
)
BRANCH: Option[str | None] = Option(
    "--branch", None, "the branch a push deploys", None, shown="main"
)
APP_KEEP_OLD: Option[str | None] = Option(
    "--keep-old",
    None,
    "how long a retired version stays ready for `fluster rollback` (90s, 10m, 2h, 1d)",
    None,
    shown=KEEP_OLD_TEXT,
    metavar="DURATION",
)
SCHEDULER: Option[str | None] = Option(
    "--scheduler",
    None,
    "where containers run: local (this Docker engine) or swarm (a Swarm service per version)",
    None,
    one_of("local", "swarm"),
    shown="local",
)
HEALTH_TIMEOUT: Option[float | None] = Option(
    "--health-timeout",
    None,
    "seconds for every new instance to be registered up",
    None,
    number(above=0),
    shown="120",
)
DRAIN_SECONDS: Option[float | None] = Option(
    "--drain-seconds",
    None,
    "seconds between the promotion and stopping the old containers",
    None,
    number(0),
    shown="2",
)
MEMORY: Option[str | None] = Option(
    "--memory",
    None,
    "each container's memory limit (256m, 1g; none): over it the app is killed",
    None,
    lambda text: "" if str(text).strip() == "none" else str(text).strip(),
    shown="none",
    metavar="SIZE",
)
CPUS: Option[float | None] = Option(
    "--cpus", None, "each container's CPUs (0.5, 2; 0 no limit)", None, number(0), shown="0"
)
VOLUME: Option[list[str] | None] = Option(
    "--volume",
    None,
    "mount the app's named volume NAME (Docker volume APP-NAME) at /path (repeatable; "
    "`:ro` read-only); never a host path",
    None,
    list,
    kind="list",
    metavar="NAME:/path[:ro]",
)
UNSET_VOLUME: Option[list[str] | None] = Option(
    "--unset-volume", None, "unmount the volume on /path (repeatable)", None, list,
    kind="list", metavar="/path",
)  # fmt: skip
RELEASE_COMMAND: Option[str | None] = Option(
    "--release-command",
    None,
    "run once per release in a one-off container before traffic (migrations); a non-zero "
    "exit refuses the release. Wins over the Procfile's release: line (none: no command)",
    None,
    lambda text: "" if str(text).strip() == "none" else str(text),
    shown="the Procfile's release: line",
    metavar="COMMAND",
)
CANARY_STEPS: Option[tuple[int, ...] | None] = Option(
    "--canary-steps",
    None,
    "traffic shares a new release goes through before its promotion, each judged by the "
    "edges' counters for --canary-interval (e.g. 10,50; none: promote at once)",
    None,
    canary_steps,
    shown="none",
    metavar="PCT,PCT",
)
CANARY_INTERVAL: Option[float | None] = Option(
    "--canary-interval", None, "how long each step is observed (10s, 1m)", None,
    duration_seconds, shown="30s", metavar="DURATION",
)  # fmt: skip
CANARY_MAX_ERRORS: Option[float | None] = Option(
    "--canary-max-errors", None, "the bar: the new release's 5xx share of its responses in a "
    "step (or the active release's, when higher)", None, percent, shown="1%", metavar="PCT",
)  # fmt: skip
CANARY_MIN_REQUESTS: Option[int | None] = Option(
    "--canary-min-requests", None, "responses a step needs to be judged (it waits up to two "
    "more intervals, then goes on with a warning)", None, integer(1, 10**9), shown="20",
    metavar="N",
)  # fmt: skip
CANARY_MAX_LATENCY: Option[float | None] = Option(
    "--canary-max-latency", None, "judge response times too: the new release's mean "
    "response time in a step may not exceed this, or the active release's when higher "
    "(250ms, 1s; none: not judged)", None, lambda text: latency(text) or 0.0,
    shown="not judged", metavar="DURATION",
)  # fmt: skip
APP_FIELDS: tuple[Option[Any], ...] = (
    SERVICE,
    REPLICAS,
    PORT,
    CHECK,
    ENV,
    UNSET_ENV,
    SECRET,
    UNSET_SECRET,
    BRANCH,
    APP_KEEP_OLD,
    SCHEDULER,
    HEALTH_TIMEOUT,
    DRAIN_SECONDS,
    MEMORY,
    CPUS,
    VOLUME,
    UNSET_VOLUME,
    RELEASE_COMMAND,
    CANARY_STEPS,
    CANARY_INTERVAL,
    CANARY_MAX_ERRORS,
    CANARY_MIN_REQUESTS,
    CANARY_MAX_LATENCY,
)

REPOS: Option[str] = Option(
    "--repos", "FLUSTER_REPOS", "where the apps' git repositories are", "/var/lib/fluster/repos"
)
REGISTRY: Option[str] = Option(
    "--registry", "FLUSTER_REGISTRY", "the registry images go to (host:port)", "127.0.0.1:5000"
)
SSH_HOST: Option[str] = Option(
    "--ssh-host", "FLUSTER_SSH_HOST", "host in the printed remote", "", shown="this host's name"
)
SSH_USER: Option[str] = Option(
    "--ssh-user", "FLUSTER_SSH_USER", "user in the printed remote", "", shown="the current user"
)
SSH_PORT: Option[int] = Option(
    "--ssh-port", "FLUSTER_SSH_PORT", "ssh port in the printed remote", 22, integer(1, 65535)
)
IMAGE: Option[str] = Option("--image", None, "deploy this already-built image", "")
GIT: Option[str] = Option("--git", None, "build from this git repository", "", metavar="DIR")
REF: Option[str] = Option("--ref", None, "with --git: the branch, tag or commit", "")
RECEIVE = switch("--receive", None, "with --git: read a pre-receive hook's input (the hook's)")
NO_PROMOTE = switch("--no-promote", None, "stop once the new version is healthy")
CANARY: Option[int | None] = Option(
    "--canary", None, "send PCT% to the new version, then wait", None, integer(1, 99), metavar="PCT"
)
DEPLOY_SCHEDULER: Option[str | None] = Option(
    "--scheduler",
    None,
    "where containers run: local or swarm (DOCKER_HOST then names a swarm manager)",
    None,
    one_of("local", "swarm"),
    shown="the app's config",
)
LOCK_TIMEOUT: Option[float] = Option(
    "--lock-timeout",
    None,
    "seconds to wait for another deploy of the app",
    600.0,
    number(above=0),
    metavar="SECONDS",
)
PUBLISH_IP: Option[str] = Option(
    "--publish-ip",
    "FLUSTER_PUBLISH_IP",
    "host address the containers' ports are published on",
    "127.0.0.1",
)
NETWORK: Option[str] = Option(
    "--network",
    "FLUSTER_NETWORK",
    "Docker network the containers join (an edge in a container on it reaches them)",
    "",
    shown="Docker's default bridge",
)
DOCKER_HOST: Option[str] = Option(
    "--docker-host", "DOCKER_HOST", "Docker engine API", "", shown="the local socket"
)
DEPLOY_WAIT: Option[float] = Option(
    "--wait-timeout",
    None,
    "seconds for every reloader to apply the promotion",
    WAIT_TIMEOUT_S,
    number(above=0),
    metavar="SECONDS",
)
JSON = switch("--json", None, "machine-readable output")
# Bounds on what a push may make the deploy host do (docs/SECURITY.md).
BUILD_TIMEOUT: Option[float] = Option(
    "--build-timeout",
    "FLUSTER_BUILD_TIMEOUT",
    "seconds a build may run; past it the build is stopped and the push refused",
    900.0,
    number(above=0),
    metavar="SECONDS",
)
MAX_CONTEXT: Option[int] = Option(
    "--max-context",
    "FLUSTER_MAX_CONTEXT",
    "largest build context (the pushed tree) in MiB; a bigger push is refused",
    1024,
    integer(1, 1 << 20),
    metavar="MIB",
)
BUILD_NETWORK: Option[str] = Option(
    "--build-network",
    "FLUSTER_BUILD_NETWORK",
    "network of a build's RUN steps: none, or a Docker network (bridge, ...) for builds "
    "that download; a build on a network can reach whatever that network reaches",
    "none",
)
BASE_IMAGES: Option[str] = Option(
    "--base-images",
    "FLUSTER_BASE_IMAGES",
    "images a build may start FROM besides its own app's (comma-separated patterns, "
    "e.g. 'debian:*,python:3.*'); another app's images are refused whatever this says",
    "",
    shown="any image on the host but another app's",
    metavar="PATTERNS",
)
BUILD_LIMITS = (BUILD_TIMEOUT, MAX_CONTEXT, BUILD_NETWORK, BASE_IMAGES)

# Deploy keys (`fluster app keys add|ls|rm APP`) and the forced command they run.
KEY_NAME: Option[str] = Option(
    "--name", None, "the deploy key's name (whose key it is); recorded as who deployed", ""
)
PUBLIC_KEY: Option[str] = Option(
    "--key", None, "the OpenSSH public key file (- reads stdin)", "", metavar="FILE"
)
AUTHORIZED_KEYS: Option[str] = Option(
    "--authorized-keys",
    "FLUSTER_AUTHORIZED_KEYS",
    "the deploy user's authorized_keys file",
    "~/.ssh/authorized_keys",
    metavar="FILE",
)
SHELL_KEY: Option[str] = Option("--key", None, "the deploy key's name", "", metavar="NAME")
SHELL_APPS: Option[str] = Option(
    "--apps", None, "the apps the key may push (comma-separated)", "", metavar="APPS"
)
KEYS_ADD = (APP, KEY_NAME, PUBLIC_KEY, AUTHORIZED_KEYS, REPOS)
KEYS_LS = (APP, AUTHORIZED_KEYS)
KEYS_RM = (APP, KEY_NAME, AUTHORIZED_KEYS)
GIT_SHELL = (REPOS, SHELL_KEY, SHELL_APPS)

# What `app create` writes into the hook, for every deploy a push runs.
HOOK_SETTINGS = (REGISTRY, PUBLISH_IP, NETWORK, DOCKER_HOST, *BUILD_LIMITS)
APP_CREATE = (APP, *APP_FIELDS, REPOS, SSH_HOST, SSH_USER, SSH_PORT, *HOOK_SETTINGS)
CANARY_FIELDS: tuple[Option[Any], ...] = (
    CANARY_STEPS,
    CANARY_INTERVAL,
    CANARY_MAX_ERRORS,
    CANARY_MIN_REQUESTS,
    CANARY_MAX_LATENCY,
)
DEPLOY: tuple[Option[Any], ...] = (
    APP,
    IMAGE,
    GIT,
    REF,
    RECEIVE,
    NO_PROMOTE,
    CANARY,
    *CANARY_FIELDS,
    DEPLOY_SCHEDULER,
    LOCK_TIMEOUT,
    REGISTRY,
    PUBLISH_IP,
    NETWORK,
    DOCKER_HOST,
    DEPLOY_WAIT,
    *BUILD_LIMITS,
)
DEPLOYS = (APP, JSON)
NO_RESTART = switch(
    "--no-restart",
    None,
    "only store the change: the next release runs with it (by default a change of env, "
    "secrets, limits, volumes, port or check is a new release now, and --replicas scales)",
)
# What runs an app's containers (the hook's settings, on the command line or from env).
RUNNING = (PUBLISH_IP, NETWORK, DOCKER_HOST, LOCK_TIMEOUT, DEPLOY_WAIT)
APP_CONFIG = (APP, *APP_FIELDS, NO_RESTART, REGISTRY, *RUNNING)
# `fluster rollback APP` of an app restarts its previous version's containers.
ROLLBACK_TO: Option[str] = Option(
    "--to",
    None,
    "of an app: the release to go back to (v7, or a git sha); its config comes back too",
    "",
    shown="the previous active version",
    metavar="vN|SHA",
)
ROLLBACK_APP = (ROLLBACK_TO, REGISTRY, PUBLISH_IP, NETWORK, DOCKER_HOST, LOCK_TIMEOUT)
COUNT: Option[int] = Option(
    "count", None, "instances of the active release", 1, integer(1, 100), kind="positional",
    metavar="N",
)  # fmt: skip
SCALE = (APP, COUNT, *RUNNING)
FOLLOW = switch("--follow", None, "keep printing new lines as they come", short="-f")
TAIL: Option[int | None] = Option(
    "--tail", None, "the last N lines of each instance", None, integer(0, 100000),
    shown="100, or all with --since", metavar="N",
)  # fmt: skip
SINCE: Option[str] = Option(
    "--since", None, "lines from the last DURATION only (90s, 10m, 2h, 1d)", "", metavar="DURATION"
)
RELEASE: Option[str] = Option(
    "--release", None, "this release's instances (v7)", "", shown="the running ones", metavar="vN"
)
LOGS = (APP, FOLLOW, TAIL, SINCE, RELEASE, DOCKER_HOST)
RUN_COMMAND: Option[list[str]] = Option(
    "argv", None, "the command and its arguments (after --)", [], list, kind="positional",
    metavar="CMD", nargs="...",
)  # fmt: skip
RUN = (APP, RUN_COMMAND, NETWORK, DOCKER_HOST)
DEPLOY_ID: Option[str] = Option("deploy", None, "the deploy whose old release retires", "",
                                kind="positional", metavar="DEPLOY")  # fmt: skip
RETIRE = (APP, DEPLOY_ID, DOCKER_HOST, LOCK_TIMEOUT)
DRY_RUN = switch("--dry-run", None, "only say what would go")  # gc's, read by its dest
# The rollback command's positional (declared in fluster.cli), read by its dest.
SERVICE_ARG: Option[str] = Option("service", None, "", "", kind="positional")
