"""A seeded generator of adversarial etcd records, each with the verdict it must get.

Every record is built to be invalid (or outside the key layout) by construction, so the
test's oracle is the generator, not the validator under test:

- `reject`: a key inside the layout (`services/S/spec`, `services/S/instances/I`) whose
  name or value breaks a rule: the catalog must skip it and count it;
- `ignore`: a key outside the layout (`services/S/instances/a/b`, ...): never served and,
  being another tool's business, not counted.

Categories: wrong JSON types, missing fields, out-of-range numbers, config-injection
payloads (newlines, `#`, quotes, backslashes, `%[`, Jinja delimiters, NUL, Unicode line
separators) in every string field, huge and empty values, non-UTF-8 bytes, malformed
JSON, plain-text addresses with payloads, bad service/instance names including non-UTF-8
key bytes, and invalid specs. Keys never repeat, so "counted" can be checked exactly.

`escapes` are the shapes that once got past the validator (found by this fuzzing, fixed
in records.py): JSON nested deeper than Python's recursion limit, integers beyond its
digit limit, IPv6 literals with a zone id (`fe80::1%...`, with or without a payload).
`known_escapes()` keeps one fixed instance of each for the targeted regression tests.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["reject", "ignore"]

PAYLOADS = (
    "\n",
    "\r\n",
    "\nbackend evil\n  server x 6.6.6.6:80",
    "\n    server evil 6.6.6.6:80 weight 256",
    " #",
    "#",
    "'",
    '"',
    "\\",
    "\\n",
    "%[src]",
    "%[req.hdr(host)]",
    "${HOME}",
    "{{ 7*7 }}",
    "{% raw %}",
    " ",
    "\t",
    "\x00",
    "\x7f",
    "\x1b[31m",
    "\u2028",
    "\u0085",
    "é",
    ";",
    "`id`",
    "$(id)",
    "|",
    "<",
    "*",
    ",",
)
WRONG_TYPES: tuple[object, ...] = (
    None,
    True,
    False,
    [],
    {},
    [80],
    {"a": 1},
    1.5,
    80.0,
    -1,
    0,
    "",
    "80",
)


@dataclass(frozen=True, slots=True)
class Record:
    key: bytes
    value: bytes
    verdict: Verdict
    category: str


def _inject(rng: random.Random, base: str) -> str:
    payload = rng.choice(PAYLOADS)
    cut = rng.randint(0, len(base))
    return base[:cut] + payload + base[cut:]


class Fuzzer:
    """`records(n)` yields n adversarial records under `prefix`, deterministically per seed."""

    def __init__(self, prefix: str, seed: int, services: tuple[str, ...] = ("web", "api")) -> None:
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.services = services
        self.n = 0

    # -- keys ---------------------------------------------------------------------------

    def _ikey(self, service: str | None = None, instance: str | None = None) -> bytes:
        service = service or self.rng.choice(self.services)
        instance = instance or f"fz{self.n}"
        return f"{self.prefix}/services/{service}/instances/{instance}".encode()

    def _good(self) -> dict[str, object]:
        return {
            "host": f"10.{self.rng.randint(0, 255)}.{self.rng.randint(0, 255)}.1",
            "port": self.rng.randint(1, 65535),
            "version": "v1",
            "weight": 100,
            "state": "up",
            "node": "host-a",
            "tags": {"zone": "a"},
        }

    # -- categories: each returns (key, value, verdict) ---------------------------------

    def wrong_type(self) -> tuple[bytes, bytes, Verdict]:
        obj = self._good()
        field = self.rng.choice(["host", "port", "version", "weight", "state", "node", "tags"])
        choices = [v for v in WRONG_TYPES if not self._valid_as(field, v)]
        obj[field] = self.rng.choice(choices)
        return self._ikey(), json.dumps(obj).encode(), "reject"

    @staticmethod
    def _valid_as(field: str, value: object) -> bool:
        """The few WRONG_TYPES values that are legitimately fine for a field."""
        return (
            (field in ("version", "node") and value in ("", "80"))
            or (field == "tags" and value == {})
            or (field == "weight" and value == 0)
        )

    def missing(self) -> tuple[bytes, bytes, Verdict]:
        obj = self._good()
        del obj[self.rng.choice(["host", "port"])]
        return self._ikey(), json.dumps(obj).encode(), "reject"

    def out_of_range(self) -> tuple[bytes, bytes, Verdict]:
        obj = self._good()
        field, value = self.rng.choice(
            [
                ("port", 0),
                ("port", 65536),
                ("port", -80),
                ("port", 2**64 + 80),  # HAProxy would wrap this silently
                ("weight", 257),
                ("weight", -1),
                ("state", "UP"),
                ("state", "down"),
                ("state", "maint"),
                ("host", "999.1.1.1"),
                ("host", "10.0.0"),
                ("host", "a" * 64 + ".com"),
                ("host", "x" * 300),
                ("version", "v" * 65),
                ("tags", {f"k{i}": "v" for i in range(33)}),
            ]
        )
        obj[field] = value
        return self._ikey(), json.dumps(obj).encode(), "reject"

    def injection(self) -> tuple[bytes, bytes, Verdict]:
        obj = self._good()
        field = self.rng.choice(["host", "version", "node", "state", "tag_key", "tag_value"])
        if field == "tag_key":
            obj["tags"] = {_inject(self.rng, "zone"): "a"}
        elif field == "tag_value":
            obj["tags"] = {"zone": _inject(self.rng, "a")}
        else:
            base = str(obj[field])
            obj[field] = _inject(self.rng, base)
        ensure_ascii = self.rng.random() < 0.5
        return self._ikey(), json.dumps(obj, ensure_ascii=ensure_ascii).encode(), "reject"

    def plain_injection(self) -> tuple[bytes, bytes, Verdict]:
        host = f"10.0.{self.rng.randint(0, 255)}.1"
        port = str(self.rng.randint(1, 65535))
        text = self.rng.choice(
            [
                f"{host}:{_inject(self.rng, port)[:-1] or '#'}x",
                f"{_inject(self.rng, host)}:{port}".replace("\n", "\n ", 1),
                f"{host}:{port}\n{host}:{port}",
                f"{host}:{port} backup",
                f"{host}:{port}#x",
                f"{host}:",
                f":{port}",
                f"{host}:{port}:{port}",
                f"{host}:99999",
                f"{host}:0",
                f"::1:{port}",
                f"[::1]:{port}x",
                f"{host}:{port}" + "0" * 300,
            ]
        )
        if text.strip() != text:  # surrounding whitespace is legitimately stripped
            text = "x" + text
        return self._ikey(), text.encode("utf-8", "surrogatepass"), "reject"

    def huge(self) -> tuple[bytes, bytes, Verdict]:
        obj = self._good()
        size = self.rng.choice([4097, 5000, 20_000, 100_000] + [1_000_000] * (self.n % 500 == 0))
        obj["padding"] = "a" * size  # unknown fields are ignored: only the size is wrong
        return self._ikey(), json.dumps(obj).encode(), "reject"

    def empty(self) -> tuple[bytes, bytes, Verdict]:
        value = self.rng.choice(
            [b"", b" ", b"\n", b"{}", b"[]", b"null", b"0", b"true", b'""', b"{", b"}"]
        )
        return self._ikey(), value, "reject"

    def non_utf8(self) -> tuple[bytes, bytes, Verdict]:
        good = json.dumps(self._good()).encode()
        value = self.rng.choice(
            [
                good.replace(b"host-a", b"host-\xff"),
                good.replace(b"v1", b"v\xc3\x28"),
                good.replace(b'"zone"', b'"zo\xed\xa0\x80ne"'),  # an encoded surrogate
                b"\xff\xfe" + good,
                b"10.0.0.1:80\xff",
                b"10.0.0.\xc0\xae:80",
                bytes(self.rng.randrange(256) for _ in range(self.rng.randint(1, 64))) + b"\xff",
                "10.0.0.1:\uff18\uff10".encode(),  # fullwidth digits: str.isdigit() says yes
            ]
        )
        return self._ikey(), value, "reject"

    def malformed_json(self) -> tuple[bytes, bytes, Verdict]:
        good = json.dumps(self._good())
        value = self.rng.choice(
            [
                good[: self.rng.randint(1, len(good) - 1)],
                good[:-1] + ",}",
                good.replace('"host"', "host", 1),
                good.replace('"', "'"),
                good.replace("}", '}{"x":1}'),
                '{"host": "10.0.0.1", "port": NaN}',
                '{"host": "10.0.0.1", "port": Infinity}',
                '{"host": "10.0.0.1", "port": 8e1}',
                '{"host": "10.0.0.1", "port": 80, "port": "80"}',
                '{"host": ["10.0.0.1"], "port": 80}',
                '{"host": "10.0.0.1", "port": 80, "tags": {"a": {"b": "c"}}}',
                '{"host": "10.0.0.1", "port": 80, "weight": true}',
                '{"host": "10.0.0.1\\u0000", "port": 80}',
                '{"host": "10.0.0.1\\ud800", "port": 80}',
                '{"host": "10.0.0.1", "port": 80}' + "x",
            ]
        )
        return self._ikey(), value.encode(), "reject"

    def bad_name(self) -> tuple[bytes, bytes, Verdict]:
        """A valid value under a key whose service or instance name breaks the rules."""
        value = json.dumps(self._good()).encode()
        u = f"z{self.n}"  # keeps keys unique
        if self.rng.random() < 0.5:
            service = self.rng.choice(
                [
                    f"Web{u}",
                    f"web_{u}",
                    f"-web{u}",
                    f"web{u}-",
                    f"web.{u}",
                    f"wéb{u}",
                    f"web {u}",
                    f"web#{u}",
                    f"web\n{u}",
                    "a" * 62 + u,
                    f"{u}%[src]",
                ]
            )
            return self._ikey(service=service), value, "reject"
        instance = self.rng.choice(
            [
                f"i {u}",
                f"i#{u}",
                f"i\n{u}",
                f"i'{u}",
                f'i"{u}',
                f"i\\{u}",
                f"i%[{u}]",
                f"ï{u}",
                f"{u}" + "x" * 200,
                f"{u}" + "y" * 5000,
                f"{u}:80",
                f"{u}@host",
            ]
        )
        if self.rng.random() < 0.2:  # raw bytes that are not UTF-8 at all
            return self._ikey(instance=u) + b"\xff\xfe", value, "reject"
        return self._ikey(instance=instance), value, "reject"

    def odd_key(self) -> tuple[bytes, bytes, Verdict]:
        """Keys outside the layout, with values that would be valid: never served."""
        value = json.dumps(self._good()).encode()
        svc, u = self.rng.choice(self.services), f"z{self.n}"
        root = f"{self.prefix}/services/"
        key = self.rng.choice(
            [
                f"{root}{svc}/instances/{u}/extra",
                f"{root}{svc}/instances/{u}/",
                f"{root}{svc}/instance/{u}",
                f"{root}{svc}/{u}",
                f"{root}{svc}/spec/{u}",
                f"{root}{svc}/spec.{u}",
                f"{root}{svc}//instances/{u}",
                f"{root}{u}",
                f"{root}{u}/instances",
            ]
        )
        return key.encode(), value, "ignore"

    def empty_names(self) -> tuple[bytes, bytes, Verdict]:
        """Empty names are inside the layout (an empty segment), so rejected and counted."""
        value = json.dumps(self._good()).encode()
        # Each key can exist once; after the first use fall back to a unique bad name.
        if self.n % 2:
            key = f"{self.prefix}/services//instances/z{self.n}"
        else:
            key = f"{self.prefix}/services/e{self.n}/instances/"
        return key.encode(), value, "reject"

    def bad_spec(self) -> tuple[bytes, bytes, Verdict]:
        spec: dict[str, object] = {"mode": "http", "hosts": [f"s{self.n}.example.com"]}
        field, bad = self.rng.choice(
            [
                ("mode", "udp"),
                ("mode", "HTTP"),
                ("mode", None),
                ("hosts", "a.example.com"),
                ("hosts", [_inject(self.rng, "a.example.com")]),
                ("hosts", [f"h{i}.example.com" for i in range(33)]),
                ("hosts", [1]),
                ("path_prefix", _inject(self.rng, "/api")),
                ("path_prefix", "api"),
                ("port", 70000),
                ("port", "80"),
                ("balance", "roundrobin\n  server x 1.1.1.1:1"),
                ("balance", "hash"),
                ("check", {"path": _inject(self.rng, "/health")}),
                ("check", {"interval_ms": 1}),
                ("check", "/health"),
                ("active_version", _inject(self.rng, "v2")),
                ("canary", {"version": "v2", "weight": 101}),
                ("canary", {"weight": 5}),
                ("canary", {"version": _inject(self.rng, "v2"), "weight": 5}),
                ("history", "v1"),
                ("history", [_inject(self.rng, "v1")]),
                ("keep_old_until", "tomorrow"),
                ("keep_old_until", "2026-01-01T00:00:00"),
            ]
        )
        spec[field] = bad
        key = f"{self.prefix}/services/fz{self.n}/spec".encode()
        raw = json.dumps(spec).encode()
        if self.rng.random() < 0.1:
            raw = self.rng.choice([b"", b"[]", b"{", raw[:-1], raw + b"\xff", b"x" * 16385])
        return key, raw, "reject"

    def escapes(self) -> tuple[bytes, bytes, Verdict]:
        kind = self.rng.choice(["deep", "deep_spec", "digits", "zone", "zone_plain", "zone_spec"])
        good = self._good()
        if kind == "deep":  # under the 4 KiB limit, deeper than the recursion limit
            depth = self.rng.randint(1100, 2000)
            value = json.dumps(good)[:-1] + ', "a": ' + "[" * depth + "]" * depth + "}"
            return self._ikey(), value.encode(), "reject"
        spec_key = f"{self.prefix}/services/fz{self.n}/spec".encode()
        if kind == "deep_spec":
            depth = self.rng.randint(1100, 8000)
            return spec_key, ('{"a":' + "[" * depth + "]" * depth + "}").encode(), "reject"
        if kind == "digits":  # over the 4300-digit limit, under the 16 KiB spec limit
            digits = "9" * self.rng.randint(4301, 16000)
            return spec_key, ('{"mode":"http","port":' + digits + "}").encode(), "reject"
        zone = self.rng.choice(["eth0", "lo", "1", _inject(self.rng, "eth0")])
        host = self.rng.choice(["fe80::1", "::1", "2001:db8::7"]) + "%" + zone
        if kind == "zone":
            good["host"] = host
            return self._ikey(), json.dumps(good).encode(), "reject"
        if kind == "zone_plain":
            return self._ikey(), f"[{host}]:80".encode(), "reject"
        return spec_key, json.dumps({"hosts": [host]}).encode(), "reject"

    CATEGORIES = (
        "wrong_type",
        "missing",
        "out_of_range",
        "injection",
        "plain_injection",
        "huge",
        "empty",
        "non_utf8",
        "malformed_json",
        "bad_name",
        "odd_key",
        "empty_names",
        "bad_spec",
        "escapes",
    )
    WEIGHTS = (12, 3, 8, 25, 8, 2, 3, 6, 8, 10, 5, 1, 9, 3)

    def records(self, count: int) -> Iterator[Record]:
        for _ in range(count):
            self.n += 1
            category = self.rng.choices(self.CATEGORIES, self.WEIGHTS)[0]
            key, value, verdict = getattr(self, category)()
            yield Record(key, value, verdict, category)


# One fixed record of each shape that once escaped the validator: an exception other
# than RecordError (which stopped a catalog) or accepted with the payload intact. The
# regression tests in tests/test_reliability_fuzz.py put each one through a catalog, a
# reloader and a sidekick.
def known_escapes(prefix: str) -> dict[str, Record]:
    root = f"{prefix}/services"
    deep = b'{"a":' + b"[" * 2040 + b"]" * 2040 + b"}"  # under the 4 KiB instance limit
    digits = b'{"mode":"http","port":' + b"9" * 5000 + b"}"  # under the 16 KiB spec limit
    # Python's ipaddress accepts any IPv6 scope id after '%', newlines and all.
    scoped = "fe80::1%\nbackend evil\n  server evil 6.6.6.6:80"
    return {
        "deep-json-instance": Record(f"{root}/web/instances/deep".encode(), deep, "reject", "x"),
        "deep-json-spec": Record(f"{root}/crash/spec".encode(), deep, "reject", "x"),
        "huge-int-spec": Record(f"{root}/crash2/spec".encode(), digits, "reject", "x"),
        "ipv6-scope-host": Record(
            f"{root}/web/instances/scoped".encode(),
            json.dumps({"host": scoped, "port": 80}).encode(),
            "reject",
            "x",
        ),
        # Even a well-formed scope id: HAProxy cannot resolve it, so every config fails
        # `haproxy -c` while the record exists and the edge stops applying any change.
        "ipv6-scope-valid": Record(
            f"{root}/web/instances/scoped-valid".encode(),
            json.dumps({"host": "fe80::1%eth0", "port": 80}).encode(),
            "reject",
            "x",
        ),
        "ipv6-scope-plain": Record(
            f"{root}/web/instances/scoped-plain".encode(),
            b"[fe80::1%;disable frontend http]:80",  # ';' separates runtime API commands
            "reject",
            "x",
        ),
        "ipv6-scope-spec-host": Record(
            f"{root}/scoped/spec".encode(),
            json.dumps({"hosts": ['::1%\\" x']}).encode(),
            "reject",
            "x",
        ),
    }
