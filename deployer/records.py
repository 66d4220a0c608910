"""The deployer's two records in etcd: an app's config and one deploy's history.

Both are validated like the registry's records (`fluster.records`): a bad field is a
`RecordError` naming it, so `fluster app config web --replicas 0` writes nothing and says
why, and a hand-edited config that no longer parses stops a deploy before it builds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Final, Literal

from fluster.ops import KEEP_OLD_TEXT, parse_keep_old
from fluster.records import (
    CHECK_PATH_RE,
    RecordError,
    _int,
    _match,
    _object,
    _require,
    _str,
    validate_port,
    validate_service_name,
    validate_version,
)

MAX_CONFIG_BYTES: Final = 16384
MAX_DEPLOY_BYTES: Final = 65536
MAX_ENV: Final = 64
KEEP_DEPLOYS: Final = 50
SCHEDULERS: Final = ("local", "swarm")
RESULTS: Final = ("running", "succeeded", "failed", "waiting", "abandoned")
KINDS: Final = ("deploy", "config", "rollback")
# What a release runs besides its image: the app config's fields that shape a container.
# A release records them, so a rollback to it runs it as it ran (its config too).
RUNTIME_FIELDS: Final = ("port", "check", "env", "secrets", "memory", "cpus", "volumes")
MIN_MEMORY: Final = 6 << 20  # Docker's own minimum
MASK: Final = "(secret)"

ENV_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
BRANCH_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
MEMORY_RE: Final = re.compile(r"([1-9][0-9]{0,12})([kmg]?)", re.IGNORECASE)
VOLUME_RE: Final = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,63}):(/[^:\0]{0,255}?)(:ro)?")
CHECK_RE: Final = re.compile(r"none|tcp|docker|http:" + CHECK_PATH_RE.pattern)

Scheduler = Literal["local", "swarm"]
Result = Literal["running", "succeeded", "failed", "waiting", "abandoned"]
Kind = Literal["deploy", "config", "rollback"]


def validate_app_name(name: object) -> str:
    """App names are service names: the app deploys as the service of the same name."""
    try:
        return validate_service_name(name)
    except RecordError as exc:
        raise RecordError("app", exc.reason) from None


def _env(value: object, name: str = "env") -> dict[str, str]:
    _require(isinstance(value, dict), name, "must be an object of strings")
    assert isinstance(value, dict)
    _require(len(value) <= MAX_ENV, name, f"at most {MAX_ENV} variables")
    clean = {}
    for key, val in sorted(value.items()):
        _match(ENV_KEY_RE, key, name, "names must be [A-Za-z_][A-Za-z0-9_]*")
        text = _str(val, f"{name}.{key}")
        _require(text.isprintable() and len(text) <= 4096, f"{name}.{key}", "must be printable")
        clean[key] = text
    return clean


def _command(value: object, name: str = "release_command") -> str:
    text = _str(value, name)
    _require(text.isprintable() and len(text) <= 4096, name, "one printable line")
    return text


def _keep_old(value: object) -> str:
    text = _str(value, "keep_old")
    try:
        parse_keep_old(text)
    except ValueError as exc:
        raise RecordError("keep_old", f"{exc} (e.g. 90s, 10m, 2h, 1d)") from None
    return text


def memory_bytes(text: str) -> int:
    """`512m` -> bytes (k, m, g: powers of 1024; no unit: bytes); 0 for ""."""
    if not text:
        return 0
    found = MEMORY_RE.fullmatch(text)
    if found is None:
        raise ValueError(f"want a size such as 256m or 1g, got {text!r}")
    number, unit = found.groups()
    return int(number) << {"": 0, "k": 10, "m": 20, "g": 30}[unit.lower()]


def _memory(value: object) -> str:
    text = _str(value, "memory")
    try:
        size = memory_bytes(text)
    except ValueError as exc:
        raise RecordError("memory", str(exc)) from None
    _require(not text or size >= MIN_MEMORY, "memory", "at least 6m (Docker's minimum)")
    return text


def _volumes(value: object) -> tuple[str, ...]:
    _require(isinstance(value, list | tuple), "volumes", "must be a list of NAME:/path")
    assert isinstance(value, list | tuple)
    _require(len(value) <= 16, "volumes", "at most 16")
    out = []
    for item in value:
        text = _str(item, "volumes")
        found = VOLUME_RE.fullmatch(text)
        _require(
            found is not None and ".." not in text.split(":")[1].split("/"),
            "volumes",
            f"want NAME:/absolute/path[:ro] (a named volume, never a host path), got {text!r}",
        )
        out.append(text)
    paths = [v.split(":")[1] for v in out]
    _require(len(set(paths)) == len(paths), "volumes", "two volumes on one path")
    return tuple(out)


def _steps(value: object) -> tuple[int, ...]:
    _require(isinstance(value, list | tuple), "canary_steps", "must be a list of percentages")
    assert isinstance(value, list | tuple)
    steps = tuple(_int(v, "canary_steps", 1, 99) for v in value)
    _require(list(steps) == sorted(set(steps)), "canary_steps", "must rise, e.g. [10, 50]")
    return steps


def _float(value: object, name: str, lo: float, hi: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    _require(ok, name, f"must be a number, not {type(value).__name__}")
    assert isinstance(value, int | float)
    _require(lo <= value <= hi, name, f"must be between {lo:g} and {hi:g}, got {value}")
    return float(value)


@dataclass(frozen=True, slots=True)
class AppConfig:
    """How an app runs: `{prefix}/apps/{app}/config`, written by `fluster app`."""

    service: str
    replicas: int = 2
    port: int = 8000
    check: str = "http:/health"  # the sidekick's --check syntax: http:/PATH, tcp, docker, none
    env: Mapping[str, str] = field(default_factory=dict)
    # Given to the containers like env, never printed: every listing shows MASK.
    secrets: Mapping[str, str] = field(default_factory=dict)
    branch: str = "main"
    keep_old: str = KEEP_OLD_TEXT  # how long a retired version stays ready for a rollback
    scheduler: Scheduler = "local"
    health_timeout: float = 120.0  # seconds for every new instance to be registered up
    drain_seconds: float = 2.0  # between the promotion and stopping the old containers
    memory: str = ""  # a container's memory limit (256m, 1g); "" none
    cpus: float = 0.0  # a container's share of CPUs (0.5, 2); 0 no limit
    volumes: tuple[str, ...] = ()  # NAME:/path[:ro]: the app's own named volumes
    release_command: str = ""  # run once per release before traffic (else Procfile's)
    # Progressive delivery (fluster.analysis): the shares a new release goes through,
    # each judged by the edges' counters, before its promotion; () promotes at once.
    canary_steps: tuple[int, ...] = ()
    canary_interval: float = 30.0
    canary_max_errors: float = 1.0  # percent
    canary_min_requests: int = 20
    canary_max_latency: float = 0.0  # seconds of mean response time; 0: not judged

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["env"] = dict(self.env)
        out["secrets"] = dict(self.secrets)
        out["volumes"] = list(self.volumes)
        out["canary_steps"] = list(self.canary_steps)
        return out

    def runtime(self) -> dict[str, Any]:
        """What a release records of this config: what shapes its containers."""
        whole = self.to_dict()
        return {name: whole[name] for name in RUNTIME_FIELDS}

    def shown(self) -> dict[str, Any]:
        """`to_dict` as listings show it: the secrets' names, never their values."""
        return {**self.to_dict(), "secrets": dict.fromkeys(sorted(self.secrets), MASK)}

    @property
    def environment(self) -> dict[str, str]:
        """What the containers get: env, then the secrets."""
        return {**self.env, **self.secrets}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def replace(self, **changes: Any) -> AppConfig:
        return AppConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> AppConfig:
        _require("service" in obj, "service", "is required")
        scheduler = obj.get("scheduler", "local")
        _require(scheduler in SCHEDULERS, "scheduler", f"must be one of {', '.join(SCHEDULERS)}")
        return cls(
            service=validate_service_name(obj["service"]),
            replicas=_int(obj.get("replicas", 2), "replicas", 1, 100),
            port=validate_port(obj.get("port", 8000), "port"),
            check=_match(
                CHECK_RE,
                obj.get("check", "http:/health"),
                "check",
                "want http:/PATH, tcp, docker or none",
            ),
            env=_env(obj.get("env", {})),
            secrets=_env(obj.get("secrets", {}), "secrets"),
            branch=_match(BRANCH_RE, obj.get("branch", "main"), "branch", "a git branch name"),
            keep_old=_keep_old(obj.get("keep_old", KEEP_OLD_TEXT)),
            scheduler=scheduler,
            health_timeout=_float(obj.get("health_timeout", 120.0), "health_timeout", 1, 3600),
            drain_seconds=_float(obj.get("drain_seconds", 2.0), "drain_seconds", 0, 600),
            memory=_memory(obj.get("memory", "")),
            cpus=_float(obj.get("cpus", 0.0), "cpus", 0, 256),
            volumes=_volumes(obj.get("volumes", [])),
            release_command=_command(obj.get("release_command", "")),
            canary_steps=_steps(obj.get("canary_steps", [])),
            canary_interval=_float(obj.get("canary_interval", 30.0), "canary_interval", 1, 3600),
            canary_max_errors=_float(
                obj.get("canary_max_errors", 1.0), "canary_max_errors", 0, 100
            ),
            canary_max_latency=_float(
                obj.get("canary_max_latency", 0.0), "canary_max_latency", 0, 3600
            ),
            canary_min_requests=_int(
                obj.get("canary_min_requests", 20), "canary_min_requests", 1, 10**9
            ),
        )

    @classmethod
    def parse(cls, raw: bytes | str) -> AppConfig:
        return cls.from_dict(_object(raw, MAX_CONFIG_BYTES, "app config"))


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a deploy, as it is printed and recorded."""

    name: str
    started: str
    ended: str | None = None
    ok: bool | None = None
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        if self.ended is None:
            return None
        delta = datetime.fromisoformat(self.ended) - datetime.fromisoformat(self.started)
        return delta.total_seconds()


@dataclass(frozen=True, slots=True)
class DeployRecord:
    """`{prefix}/apps/{app}/deploys/{id}`: what was deployed, by whom, each stage, result.

    A deploy that puts a new version in front of the users is a release: it gets the
    app's next `number` (v1, v2, ...) when it is promoted; a failed or refused one keeps
    0. Its `kind` says what changed: `deploy` (code: a push or an image), `config` (the
    same image with a new config) or `rollback` (an earlier release again). `runtime` is
    the config it ran with (`AppConfig.runtime`), so a rollback to it runs it as it ran.
    """

    id: str
    app: str
    kind: Kind
    ref: str
    version: str
    image: str
    by: str
    started: str
    stages: tuple[Stage, ...] = ()
    result: Result = "running"
    finished: str | None = None
    error: str = ""
    branch: str = ""  # a push: the ref it moves (refs/heads/main), once the hook succeeds
    number: int = 0  # vN once released; 0: not (yet) a release
    runtime: Mapping[str, Any] = field(default_factory=dict)
    command: str = ""  # the Procfile's web: line ("" the image's CMD)
    author: str = ""  # a commit's: its git author, as `git log` shows it

    @property
    def name(self) -> str:
        """`v7`, or "-" for a deploy that released nothing."""
        return f"v{self.number}" if self.number else "-"

    def to_json(self) -> str:
        out = asdict(self)
        out["stages"] = [asdict(s) for s in self.stages]
        out["runtime"] = dict(self.runtime)
        return json.dumps(out, sort_keys=True, separators=(",", ":"))

    def shown(self) -> dict[str, Any]:
        """`to_json` as listings show it: the secrets' names, never their values."""
        out: dict[str, Any] = json.loads(self.to_json())
        if secrets := out["runtime"].get("secrets"):
            out["runtime"]["secrets"] = dict.fromkeys(sorted(secrets), MASK)
        out["release"] = self.name
        return out

    def config(self, current: AppConfig) -> AppConfig:
        """`current` with this release's runtime fields: how to run it again."""
        return current.replace(**self.runtime) if self.runtime else current

    @classmethod
    def parse(cls, raw: bytes | str) -> DeployRecord:
        obj = _object(raw, MAX_DEPLOY_BYTES, "deploy")
        stages = obj.get("stages", [])
        _require(isinstance(stages, list), "stages", "must be a list")
        result = obj.get("result", "running")
        _require(result in RESULTS, "result", f"must be one of {', '.join(RESULTS)}")
        kind = obj.get("kind", "deploy")
        _require(kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}")
        version = obj.get("version", "")
        runtime = obj.get("runtime", {})
        _require(isinstance(runtime, dict), "runtime", "must be an object")
        if runtime:  # validated as a config would be: a rollback runs it
            try:
                AppConfig.from_dict({"service": "x", **runtime})
            except RecordError as exc:
                raise RecordError(f"runtime.{exc.field}", exc.reason) from None
        return cls(
            id=_str(obj.get("id"), "id"),
            app=validate_app_name(obj.get("app")),
            kind=kind,
            ref=_str(obj.get("ref", ""), "ref"),
            version=validate_version(version) if version else "",
            image=_str(obj.get("image", ""), "image"),
            by=_str(obj.get("by", ""), "by"),
            started=_str(obj.get("started"), "started"),
            stages=tuple(
                Stage(
                    name=_str(s.get("name"), "stages.name"),
                    started=_str(s.get("started"), "stages.started"),
                    ended=s.get("ended"),
                    ok=s.get("ok"),
                    detail=str(s.get("detail", "")),
                )
                for s in stages
                if isinstance(s, dict)
            ),
            result=result,
            finished=obj.get("finished"),
            error=str(obj.get("error", "")),
            branch=str(obj.get("branch", "")),
            number=_int(obj.get("number", 0), "number", 0, 10**9),
            runtime=runtime,
            command=_command(obj.get("command", ""), "command"),
            author=str(obj.get("author", "")),
        )
