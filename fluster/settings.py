"""Options declared once, as data: flag, environment variable, type, default and help.

Every option of `sidekick`, `reloader` and `fluster` is one `Option` value: the parser,
the environment lookup, the conversion, the fallback and the --help line all come from
it, so a default is written in exactly one place. Options shared by the three commands
(etcd, prefix, log level) are declared here once.

Why a small table on argparse rather than click or pydantic-settings: argparse is what
the three commands already speak (subcommands, groups, `--check` with an optional
value), the table is ~150 lines, and both libraries would add a dependency while still
needing our own hooks to report *every* bad value at once with exit status 2 (click
stops at the first bad value; pydantic-settings has no notion of flags and subcommands).

Flow: `add_options` declares options on a parser (an environment variable becomes the
argparse default, so a flag wins over it); after parsing, `resolve` converts every
option with its `parse`, gathering each failure in `Problems` so all are reported
together; `Values[OPTION]` then gives the typed value. Only the entry points read
`os.environ`; they pass it in here.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, NoReturn, TypeVar, cast

from fluster.channel import EtcdSettings, endpoints_from_text
from fluster.keys import DEFAULT_PREFIX, normalise_prefix

T = TypeVar("T")
EXIT_USAGE = 2
MAX_LEASE_TTL = 9_000_000_000  # etcd's MaxLeaseTTL (seconds): a larger TTL is refused by etcd
LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(Exception):
    """One or more options were invalid; the message lists every one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))
        self.problems = problems


class Problems:
    """Collects conversion errors so that all of them are reported together."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def convert(self, name: str, value: Any, fn: Callable[[Any], T], default: T) -> T:
        """`fn(value)`, or `default` with the error recorded under `name`."""
        try:
            return fn(value)
        except (ValueError, TypeError, OSError, OverflowError) as exc:
            self.items.append(f"{name}: {exc}")
            return default

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.items.append(message)

    def raise_if_any(self) -> None:
        if self.items:
            raise SettingsError(self.items)


# -- the declaration --------------------------------------------------------------------

Kind = Literal["value", "switch", "list", "positional"]


@dataclass(frozen=True, slots=True)
class Option(Generic[T]):
    """One option. `parse` turns the text given (flag or environment) into the value and
    raises ValueError with a message for the user; `default` is the value when neither is
    given (never parsed, so it may be None or computed). `shown` overrides how --help
    prints the default when it is computed at start (e.g. the host name)."""

    flag: str
    env: str | None
    help: str
    default: T
    parse: Callable[[Any], T] = str  # type: ignore[assignment]  # str suits Option[str]
    kind: Kind = "value"
    metavar: str | None = None
    shown: str | None = None
    nargs: str | None = None  # "?": an optional positional, or a flag whose value is optional
    const: str | None = None  # with nargs "?": what the flag alone stores
    required: bool = False  # reported with the other problems, not by argparse alone
    short: str | None = None  # a one-letter alias of the flag (-f)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def help_text(self) -> str:
        text = self.help.replace("%", "%%")
        shown = self.shown if self.shown is not None else _show(self.default)
        if self.required:
            text += " (required)"
        elif shown:
            text += f" (default: {shown.replace('%', '%%')})"
        if self.env:
            text += f" [env {self.env}]"
        return text


def _show(value: Any) -> str:
    if value is None or value is False or value == "" or value == ():
        return ""
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Values:
    """The typed values of resolved options: `values[TTL]` is an int."""

    def __init__(self, values: Mapping[str, Any], given: Iterable[str] = ()) -> None:
        self._values = dict(values)
        self._given = frozenset(given)

    def __getitem__(self, option: Option[T]) -> T:
        return cast(T, self._values[option.dest])

    def get(self, option: Option[T], default: T) -> T:
        """For options declared on only some subcommands."""
        return cast(T, self._values.get(option.dest, default))

    def given(self, option: Option[Any]) -> bool:
        """Whether a flag or variable set it (even to a value that was refused)."""
        return option.dest in self._given


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    options: Iterable[Option[Any]],
    environ: Mapping[str, str],
) -> None:
    """Declare `options` on `parser`; a set environment variable becomes the default."""
    for opt in options:
        given = environ.get(opt.env) if opt.env else None
        if opt.kind == "positional":
            parser.add_argument(
                opt.dest, nargs=opt.nargs, help=opt.help_text(), metavar=opt.metavar
            )
        elif opt.kind == "switch":
            parser.add_argument(
                *filter(None, (opt.short, opt.flag)),
                dest=opt.dest,
                action="store_const",
                const=True,
                default=given,
                help=opt.help_text(),
            )
        else:
            extra: dict[str, Any] = {"nargs": opt.nargs, "const": opt.const} if opt.nargs else {}
            parser.add_argument(
                opt.flag,
                default=given,
                action="append" if opt.kind == "list" else "store",
                metavar=opt.metavar,
                help=opt.help_text(),
                **extra,
            )


def resolve(args: argparse.Namespace, options: Iterable[Option[Any]], problems: Problems) -> Values:
    """Convert every option that the parser declared; failures go to `problems`."""
    out: dict[str, Any] = {}
    given = []
    for opt in options:
        if not hasattr(args, opt.dest):
            continue
        raw = getattr(args, opt.dest)
        if raw is None or (raw == "" and opt.kind != "positional"):  # `ETCD_CACERT=`: unset
            problems.check(not opt.required, f"{opt.flag} is required")
            out[opt.dest] = opt.default
            continue
        given.append(opt.dest)
        if raw is True and opt.kind == "switch":
            out[opt.dest] = True
            continue
        label = opt.flag if opt.kind != "positional" else opt.dest.upper()
        out[opt.dest] = problems.convert(label, raw, opt.parse, opt.default)
    return Values(out, given)


# -- value types: each raises ValueError with a message for the user ---------------------


def boolean(text: Any) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"want true/false (1/0, yes/no), got {text!r}")


def _number(text: Any, kind: Callable[[str], T]) -> T:
    try:
        value = kind(str(text).strip())
    except ValueError:
        name = "an integer" if kind is int else "a number"
        raise ValueError(f"want {name}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"want a finite number, got {text!r}")
    return value


def integer(low: int | None = None, high: int | None = None) -> Callable[[Any], int]:
    def parse(text: Any) -> int:
        value = _number(text, int)
        if (low is not None and value < low) or (high is not None and value > high):
            raise ValueError(f"must be {_range(low, high)}, got {text}")
        return value

    return parse


def number(low: float | None = None, *, above: float | None = None) -> Callable[[Any], float]:
    """A finite float `>= low` (or `> above`)."""

    def parse(text: Any) -> float:
        value = _number(text, float)
        if low is not None and value < low:
            raise ValueError(f"must be >= {low:g}, got {text}")
        if above is not None and value <= above:
            raise ValueError(f"must be > {above:g}, got {text}")
        return value

    return parse


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"{low}-{high}"
    return f">= {low}" if low is not None else f"<= {high}"


positive_float = number(above=0)
non_negative_float = number(0)
positive_int = integer(1)


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(text: Any) -> str:
        value = str(text).strip().lower()
        if value not in choices:
            raise ValueError(f"want one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def existing_file(text: Any) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text}")
    return path


def pem_file(text: Any) -> Path:
    """An existing PEM file (certificate or key): gRPC would only log a C-level error."""
    path = existing_file(text)
    with path.open("rb") as fh:
        head = fh.read(1 << 20)
    if b"-----BEGIN " not in head:
        raise ValueError(f"not a PEM file (no '-----BEGIN'): {text}")
    return path


def bind_address(text: Any) -> tuple[str, int]:
    """`host:port`, `*:port` or `:port` -> (host, port); `*` and empty mean all addresses."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"want HOST:PORT, got {text!r}")
    host = host.strip("[]")
    return ("" if host in ("*", "") else host), int(port)


def prefix(text: Any) -> str:
    """An absolute etcd key prefix: `/fluster`, `/team/fluster/` (slashes normalised)."""
    value = str(text).strip()
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r} (e.g. {DEFAULT_PREFIX})")
    normal = normalise_prefix(value)
    if not normal:
        raise ValueError("must not be empty or '/'")
    if any(not part or part in (".", "..") for part in normal[1:].split("/")):
        raise ValueError(f"no empty, '.' or '..' parts, got {text!r}")
    return normal


# -- the options all three commands share (names are a contract) -------------------------

ETCD_ENDPOINTS: Option[tuple[str, ...]] = Option(
    "--etcd-endpoints",
    "ETCD_ENDPOINTS",
    "comma-separated host:port or https://host:port of etcd members",
    ("127.0.0.1:2379",),
    parse=endpoints_from_text,
)
ETCD_CACERT: Option[Path | None] = Option(
    "--etcd-cacert", "ETCD_CACERT", "CA bundle to verify etcd (enables TLS)", None, pem_file
)
ETCD_CERT: Option[Path | None] = Option(
    "--etcd-cert", "ETCD_CERT", "client certificate for etcd", None, pem_file
)
ETCD_KEY: Option[Path | None] = Option(
    "--etcd-key", "ETCD_KEY", "client private key for etcd", None, pem_file
)
ETCD_USER: Option[str] = Option("--etcd-user", "ETCD_USER", "etcd user name", "")
ETCD_PASSWORD: Option[str] = Option(
    "--etcd-password",
    "ETCD_PASSWORD",
    "etcd password (prefer the environment variable: flags show in ps)",
    "",
)
ETCD_TLS_SERVER_NAME: Option[str] = Option(
    "--etcd-tls-server-name",
    "ETCD_TLS_SERVER_NAME",
    "name to verify in etcd's certificate",
    "",
    shown="the first endpoint's host",
)
ETCD_TRANSPORT: Option[str] = Option(
    "--etcd-transport",
    "ETCD_TRANSPORT",
    "how to talk to etcd: grpc, or http (etcd's JSON gateway on the same port: a much "
    "smaller process; with a client certificate it needs one without a CommonName and "
    "--etcd-user); auto: http for the sidekick unless it has a client certificate, grpc "
    "for the rest",
    "auto",
    parse=one_of("auto", "grpc", "http"),
)
PREFIX: Option[str] = Option(
    "--prefix",
    "FLUSTER_PREFIX",
    "etcd key prefix of the fluster registry (absolute: starts with '/')",
    DEFAULT_PREFIX,
    parse=prefix,
)
ETCD_OPTIONS: tuple[Option[Any], ...] = (
    ETCD_ENDPOINTS,
    ETCD_CACERT,
    ETCD_CERT,
    ETCD_KEY,
    ETCD_USER,
    ETCD_PASSWORD,
    ETCD_TLS_SERVER_NAME,
    ETCD_TRANSPORT,
    PREFIX,
)


def switch(flag: str, env: str | None, help: str, short: str | None = None) -> Option[bool]:
    """An on/off flag; its variable takes 1/0, true/false, yes/no, on/off."""
    return Option(flag, env, help, False, parse=boolean, kind="switch", short=short)


def domain(text: Any) -> str:
    from fluster.records import RecordError, validate_host

    try:
        return validate_host(str(text), "--domain")
    except RecordError as exc:
        raise ValueError(exc.reason) from None


# The reloaders' domain; `fluster spec` needs the same one to know who owns SERVICE.DOMAIN.
DOMAIN: Option[str] = Option(
    "--domain",
    "RELOADER_DOMAIN",
    "services without hosts are routed by Host SERVICE.DOMAIN",
    "localhost",
    domain,
)


def log_level(env: str, default: str = "info") -> Option[str]:
    """The log level option; each command has its own variable (SIDEKICK_LOG_LEVEL...)."""
    return Option(
        "--log-level",
        env,
        "log level: " + ", ".join(LOG_LEVELS),
        default,
        parse=one_of(*LOG_LEVELS),
        metavar="LEVEL",
    )


def add_etcd_options(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    add_options(parser.add_argument_group("etcd"), ETCD_OPTIONS, environ)


def etcd_settings(values: Values, problems: Problems) -> EtcdSettings:
    """The cross-option rules of the etcd options, after `resolve`."""
    cert, key = values[ETCD_CERT], values[ETCD_KEY]
    user, password = values[ETCD_USER], values[ETCD_PASSWORD]
    problems.check(
        values.given(ETCD_CERT) == values.given(ETCD_KEY), "--etcd-cert and --etcd-key go together"
    )
    problems.check(
        not user or bool(password), "--etcd-user needs --etcd-password (or ETCD_PASSWORD)"
    )
    transport = values[ETCD_TRANSPORT]
    problems.check(
        transport != "http" or cert is None or bool(user),
        "--etcd-transport http with a client certificate needs --etcd-user: etcd's "
        "gateway takes no identity from a certificate (or use grpc)",
    )
    return EtcdSettings(
        endpoints=values[ETCD_ENDPOINTS],
        cacert=values[ETCD_CACERT],
        cert=cert,
        key=key,
        user=user or None,
        password=password or None,
        tls_server_name=values[ETCD_TLS_SERVER_NAME] or None,
        transport=cast(Literal["auto", "grpc", "http"], transport),
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, told the terminal's width: argparse asks `shutil` for it, and
    importing shutil loads the bz2 and lzma libraries, half a megabyte of every
    sidekick's memory (bench/sidekick_footprint.py)."""

    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size().columns or 80
        except (ValueError, OSError):
            width = 80
        super().__init__(prog, width=width - 2)


def make_directory(path: Path, flag: str) -> str | None:
    """Create `path` (and parents) if missing; the problem in words, or None when usable."""
    if path.exists() and not path.is_dir():
        return f"{flag}: {path} is not a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{flag}: cannot create {path}: {exc.strerror or exc}"
    return None


def options_of(*groups: Sequence[Option[Any]]) -> tuple[Option[Any], ...]:
    return tuple(opt for group in groups for opt in group)


def exit_on_problems(error: SettingsError) -> NoReturn:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(EXIT_USAGE)
