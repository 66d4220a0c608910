"""The two record types fluster keeps in etcd, and the validation that guards HAProxy.

Every value here ends up printed into haproxy.cfg or sent over the runtime API, so
validation is the only thing standing between a stray `etcdctl put` and a broken load
balancer. The rules are deliberately narrow (docs/REGISTRY.md, "Names"): a record that is
not provably harmless is rejected with a `RecordError` naming the field and the reason,
and the catalog skips it.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

MAX_INSTANCE_BYTES: Final = 4096
MAX_SPEC_BYTES: Final = 16384
MAX_TAGS: Final = 32
MAX_HOSTS: Final = 32
MAX_HISTORY: Final = 10
MAX_WEIGHT: Final = 256  # HAProxy's own ceiling for server weights

SERVICE_RE: Final = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
INSTANCE_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# Versions are git refs, image tags, semver: printable, no whitespace, quotes, '#' or '\'.
VERSION_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+@=~/-]{0,63}")
TAG_KEY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
TAG_VALUE_RE: Final = re.compile(r"[A-Za-z0-9._:+@=~/-]{0,128}")
NODE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DNS_LABEL_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
PATH_RE: Final = re.compile(r"/[A-Za-z0-9._~/%+-]{0,255}")
CHECK_PATH_RE: Final = re.compile(r"/[A-Za-z0-9._~/%+=&?-]{0,255}")

State = Literal["up", "draining"]
Mode = Literal["http", "tcp"]
STATES: Final = ("up", "draining")
MODES: Final = ("http", "tcp")
HTTPS_POLICIES: Final = ("off", "on", "redirect")
MAX_HSTS_SECONDS: Final = 2 * 365 * 86400
BALANCES: Final = ("roundrobin", "leastconn", "static-rr", "first", "source", "random")


class RecordError(ValueError):
    """A record failed validation; `field` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# -- field validators: each returns the clean value or raises RecordError ---------------


def _require(ok: bool, name: str, reason: str) -> None:
    if not ok:
        raise RecordError(name, reason)


def _str(value: object, name: str) -> str:
    _require(isinstance(value, str), name, f"must be a string, not {type(value).__name__}")
    assert isinstance(value, str)
    return value


def _int(value: object, name: str, lo: int, hi: int) -> int:
    # bool is an int subclass and floats like 8080.0 would silently truncate: both refused.
    ok = isinstance(value, int) and not isinstance(value, bool)
    _require(ok, name, f"must be an integer, not {type(value).__name__}")
    assert isinstance(value, int)
    _require(lo <= value <= hi, name, f"must be between {lo} and {hi}, got {value}")
    return value


def _bool(value: object, name: str) -> bool:
    _require(isinstance(value, bool), name, f"must be true or false, not {type(value).__name__}")
    return bool(value)


def _match(regex: re.Pattern[str], value: object, name: str, what: str) -> str:
    text = _str(value, name)
    _require(regex.fullmatch(text) is not None, name, f"{what}, got {text[:80]!r}")
    return text


def validate_service_name(name: object) -> str:
    return _match(SERVICE_RE, name, "service", "must be a DNS label of [a-z0-9-]")


def validate_instance_name(name: object) -> str:
    return _match(INSTANCE_RE, name, "instance", "must be 1-128 of [A-Za-z0-9_.-]")


def validate_version(value: object, name: str = "version") -> str:
    return _match(VERSION_RE, value, name, "must be 1-64 printable characters, no spaces")


def validate_host(value: object, name: str = "host") -> str:
    """An IP literal or a DNS name; returns it normalised (IPv6 compressed, no brackets)."""
    text = _str(value, name)
    # ipaddress accepts any IPv6 zone id ("fe80::1%anything"): never a server address.
    _require("%" not in text, name, "IPv6 zone ids are not supported")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".") if len(text) <= 253 else []
    ok = bool(labels) and all(DNS_LABEL_RE.fullmatch(label) for label in labels)
    # A name whose last label is numeric would be a mistyped IPv4 address.
    ok = ok and not labels[-1].isdigit()
    _require(ok, name, f"must be an IP address or a DNS name, got {text[:80]!r}")
    return text.rstrip(".").lower()


def validate_port(value: object, name: str = "port") -> int:
    return _int(value, name, 1, 65535)


def _tags(value: object) -> dict[str, str]:
    _require(isinstance(value, dict), "tags", "must be an object of strings")
    assert isinstance(value, dict)
    _require(len(value) <= MAX_TAGS, "tags", f"at most {MAX_TAGS} tags")
    clean: dict[str, str] = {}
    for key, val in sorted(value.items()):
        _match(TAG_KEY_RE, key, "tags", "keys must be 1-63 of [A-Za-z0-9._/-]")
        clean[key] = _match(TAG_VALUE_RE, val, f"tags.{key}", "must be printable, no spaces")
    return clean


def _timestamp(value: object, name: str) -> str | None:
    if value is None:
        return None
    text = _str(value, name)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise RecordError(name, f"must be an ISO-8601 time, got {text[:40]!r}") from None
    _require(when.tzinfo is not None, name, "must carry a time zone")
    return text


def _object(raw: bytes | str, limit: int, what: str) -> dict[str, Any]:
    """Decode a JSON object with a size limit; non-UTF-8 and non-objects are refused."""
    data = raw.encode() if isinstance(raw, str) else raw
    _require(len(data) <= limit, what, f"larger than {limit} bytes")
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecordError(what, "not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RecordError(what, f"not JSON ({exc.msg} at {exc.pos})") from None
    except RecursionError:
        raise RecordError(what, "nested too deeply") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise RecordError(what, f"not acceptable JSON ({str(exc)[:80]})") from None
    _require(isinstance(obj, dict), what, f"must be a JSON object, not {type(obj).__name__}")
    assert isinstance(obj, dict)
    return obj


def _since(value: object) -> str:
    """An ISO 8601 time with a zone, normalised to UTC seconds; "" when absent."""
    text = _str(value, "since")
    if text == "":
        return ""
    _require(len(text) <= 40, "since", "longer than 40 characters")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise RecordError("since", f"must be an ISO 8601 time, got {text[:40]!r}") from None
    _require(when.tzinfo is not None, "since", "needs a time zone (e.g. Z)")
    return when.astimezone(UTC).isoformat(timespec="seconds")


# -- Instance ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    """One running copy of a service, as a sidekick registers it."""

    host: str
    port: int
    version: str = ""
    weight: int = 100
    state: State = "up"
    node: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    since: str = ""  # when the app started (ISO 8601, UTC), for `fluster ls SERVICE`; optional

    @property
    def address(self) -> str:
        """`host:port`, with IPv6 literals bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def replace(self, **changes: Any) -> Instance:
        """A validated copy with `changes` applied."""
        return Instance.from_dict({**asdict(self), **changes})

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Instance:
        _require("host" in obj, "host", "is required")
        _require("port" in obj, "port", "is required")
        version = obj.get("version", "")
        state = obj.get("state", "up")
        _require(state in STATES, "state", f"must be one of {', '.join(STATES)}")
        node = obj.get("node", "")
        return cls(
            host=validate_host(obj["host"]),
            port=validate_port(obj["port"]),
            version=validate_version(version) if version != "" else "",
            weight=_int(obj.get("weight", 100), "weight", 0, MAX_WEIGHT),
            state=state,
            node=_match(NODE_RE, node, "node", "must be a host name") if node != "" else "",
            tags=_tags(obj.get("tags", {})),
            since=_since(obj.get("since", "")),
        )

    @classmethod
    def parse(cls, raw: bytes | str) -> Instance:
        """Parse an etcd value: an Instance JSON object, or plain `ip:port` text."""
        data = raw.encode() if isinstance(raw, str) else raw
        if not data.lstrip().startswith(b"{"):
            return cls._parse_address(data)
        return cls.from_dict(_object(data, MAX_INSTANCE_BYTES, "instance"))

    @classmethod
    def _parse_address(cls, data: bytes) -> Instance:
        _require(len(data) <= 300, "address", "too long")
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise RecordError("address", "not ASCII") from None
        host, sep, port = text.rpartition(":")
        _require(bool(sep) and bool(host), "address", f"must be HOST:PORT, got {text[:80]!r}")
        _require(port.isdigit() and len(port) <= 5, "port", f"must be digits, got {port[:20]!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        else:
            _require(":" not in host, "address", "bracket IPv6 literals: [::1]:8080")
        return cls(host=validate_host(host), port=validate_port(int(port)))


# -- ServiceSpec ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """An HTTP health check HAProxy runs against every server of the backend."""

    path: str = "/"
    interval_ms: int = 2000

    @classmethod
    def from_dict(cls, obj: object) -> Check:
        _require(isinstance(obj, dict), "check", "must be an object or null")
        assert isinstance(obj, dict)
        return cls(
            path=_match(CHECK_PATH_RE, obj.get("path", "/"), "check.path", "must be a URL path"),
            interval_ms=_int(obj.get("interval_ms", 2000), "check.interval_ms", 100, 3_600_000),
        )


@dataclass(frozen=True, slots=True)
class Canary:
    """A share of traffic (percent) sent to one version while another is active.
    `analysis`: someone judges it by the edges' counters, so every reloader publishes
    the service's per-version response counts while it is set."""

    version: str
    weight: int
    analysis: bool = False

    @classmethod
    def from_dict(cls, obj: object) -> Canary:
        _require(isinstance(obj, dict), "canary", "must be an object or null")
        assert isinstance(obj, dict)
        _require("version" in obj, "canary.version", "is required")
        return cls(
            version=validate_version(obj["version"], "canary.version"),
            weight=_int(obj.get("weight", 10), "canary.weight", 0, 100),
            analysis=obj.get("analysis", False) is True,
        )


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """How a service is routed. Absent from etcd, `ServiceSpec()` applies."""

    mode: Mode = "http"
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"
    port: int | None = None
    balance: str = "roundrobin"
    check: Check | None = None
    active_version: str | None = None
    canary: Canary | None = None
    # Previous active versions, newest first, so `fluster rollback` knows where to go.
    history: tuple[str, ...] = ()
    # Set by `fluster promote --keep-old`: before this UTC time `fluster gc` keeps the
    # records of versions no longer routed, so a rollback still has somewhere to go.
    keep_old_until: str | None = None
    # Served over HTTPS: "off", "on" (both schemes) or "redirect" (HTTP answers 308 to
    # HTTPS). None: "redirect" when a certificate covers one of its hosts, else "off".
    https: str | None = None
    hsts_seconds: int | None = None  # Strict-Transport-Security max-age on HTTPS replies
    # With no `up` instance of the active version, route nothing (503) rather than
    # keep serving the most recent version that has instances (fluster.routing).
    strict_active: bool = False

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hosts"] = list(self.hosts)
        out["history"] = list(self.history)
        if out["canary"] and not out["canary"]["analysis"]:
            del out["canary"]["analysis"]  # said only when set
        return out

    def replace(self, **changes: Any) -> ServiceSpec:
        """A validated copy with `changes` applied."""
        return ServiceSpec.from_dict({**self.to_dict(), **changes})

    def routes_version(self, version: str) -> bool:
        """Whether instances of `version` take traffic under this spec."""
        if self.active_version is None:
            return True
        canary = self.canary.version if self.canary and self.canary.weight > 0 else None
        return version in (self.active_version, canary)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> ServiceSpec:
        mode = obj.get("mode", "http")
        _require(mode in MODES, "mode", f"must be one of {', '.join(MODES)}")
        hosts = obj.get("hosts", [])
        _require(isinstance(hosts, list), "hosts", "must be a list")
        _require(len(hosts) <= MAX_HOSTS, "hosts", f"at most {MAX_HOSTS}")
        port = obj.get("port")
        _require(mode != "tcp" or port is not None, "port", "is required in tcp mode")
        balance = obj.get("balance", "roundrobin")
        _require(balance in BALANCES, "balance", f"must be one of {', '.join(BALANCES)}")
        active = obj.get("active_version")
        history = obj.get("history", [])
        _require(isinstance(history, list), "history", "must be a list")
        check, canary = obj.get("check"), obj.get("canary")
        https, hsts = obj.get("https"), obj.get("hsts_seconds")
        _require(https in (None, *HTTPS_POLICIES), "https", "must be off, on, redirect or null")
        return cls(
            mode=mode,
            hosts=tuple(validate_host(h, "hosts") for h in hosts),
            path_prefix=_match(PATH_RE, obj.get("path_prefix", "/"), "path_prefix", "URL path"),
            port=None if port is None else validate_port(port),
            balance=balance,
            check=None if check is None else Check.from_dict(check),
            active_version=None if active is None else validate_version(active, "active_version"),
            canary=None if canary is None else Canary.from_dict(canary),
            history=tuple(validate_version(v, "history") for v in history[:MAX_HISTORY]),
            keep_old_until=_timestamp(obj.get("keep_old_until"), "keep_old_until"),
            https=https,
            hsts_seconds=None if hsts is None else _int(hsts, "hsts_seconds", 0, MAX_HSTS_SECONDS),
            strict_active=_bool(obj.get("strict_active", False), "strict_active"),
        )

    @classmethod
    def parse(cls, raw: bytes | str) -> ServiceSpec:
        return cls.from_dict(_object(raw, MAX_SPEC_BYTES, "spec"))


@dataclass(frozen=True, slots=True)
class ReloaderStatus:
    """What a reloader publishes under `{prefix}/reloaders/{id}` after each apply."""

    applied_revision: int
    node: str
    at: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def parse(cls, raw: bytes | str) -> ReloaderStatus:
        obj = _object(raw, MAX_INSTANCE_BYTES, "reloader")
        return cls(
            applied_revision=_int(obj.get("applied_revision"), "applied_revision", 0, 2**63 - 1),
            node=_str(obj.get("node", ""), "node"),
            at=_str(obj.get("at", ""), "at"),
        )
