"""Record parsing and validation: the guard between etcd values and haproxy.cfg."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluster.records import (
    Instance,
    RecordError,
    ReloaderStatus,
    ServiceSpec,
    validate_host,
    validate_instance_name,
    validate_service_name,
)

# Characters that would let a value escape its place in a config line.
DANGEROUS = set(string.whitespace) | {'"', "'", "#", "\\", "`"} | {chr(c) for c in range(32)}


def test_plain_address_is_an_instance() -> None:
    assert Instance.parse(b"10.1.2.3:8080") == Instance(host="10.1.2.3", port=8080)
    assert Instance.parse("[::1]:80").address == "[::1]:80"
    assert Instance.parse(b"app.internal:443\n").host == "app.internal"


def test_json_instance_with_defaults_and_fields() -> None:
    inst = Instance.parse(json.dumps({"host": "10.0.0.1", "port": 1}))
    assert (inst.version, inst.weight, inst.state, inst.tags) == ("", 100, "up", {})
    full = Instance.parse(
        json.dumps(
            {
                "host": "10.0.0.1",
                "port": 32768,
                "version": "3f2a9c1",
                "weight": 5,
                "state": "draining",
                "node": "host-a",
                "tags": {"zone": "a"},
            }
        )
    )
    assert full.state == "draining"
    assert Instance.parse(full.to_json()) == full


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"port": 80}', "host"),
        (b'{"host": "10.0.0.1"}', "port"),
        (b'{"host": "10.0.0.1", "port": "80"}', "port"),
        (b'{"host": "10.0.0.1", "port": 80.0}', "port"),
        (b'{"host": "10.0.0.1", "port": true}', "port"),
        (b'{"host": "10.0.0.1", "port": 65536}', "port"),
        (b'{"host": "10.0.0.1", "port": 0}', "port"),
        (b'{"host": "a b", "port": 80}', "host"),
        (b'{"host": "10.0.0.1\\n", "port": 80}', "host"),
        (b'{"host": "10.0.0.1", "port": 80, "version": "v1 #x"}', "version"),
        (b'{"host": "10.0.0.1", "port": 80, "weight": 1000}', "weight"),
        (b'{"host": "10.0.0.1", "port": 80, "state": "down"}', "state"),
        (b'{"host": "10.0.0.1", "port": 80, "tags": {"a": "b c"}}', "tags.a"),
        (b'{"host": "10.0.0.1", "port": 80, "tags": []}', "tags"),
        (b"[1, 2]", "address"),
        (b'"10.0.0.1:80"', "port"),
        (b"{not json", "instance"),
        (b'{"host": "\xff", "port": 1}', "instance"),
        (b"10.0.0.1:99999", "port"),
        (b"10.0.0.1", "address"),
        (b"::1:80", "address"),
        (b"10.0.0.1:80 # x", "port"),
        (b'{"host": "10.0.0.1", "port": 80, "pad": "' + b"x" * 5000 + b'"}', "instance"),
    ],
)
def test_invalid_instances_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(RecordError) as info:
        Instance.parse(raw)
    assert info.value.field == field


def test_names() -> None:
    assert validate_service_name("web-2") == "web-2"
    for bad in ("Web", "-web", "web-", "", "a" * 64, "we b", "web/x"):
        with pytest.raises(RecordError):
            validate_service_name(bad)
    assert validate_instance_name("host-a_1.web") == "host-a_1.web"
    for bad in ("", "a b", "a/b", "x" * 129):
        with pytest.raises(RecordError):
            validate_instance_name(bad)


def test_hosts() -> None:
    assert validate_host("10.0.0.1") == "10.0.0.1"
    assert validate_host("::FFFF:1") == "::ffff:1"
    assert validate_host("API.example.com.") == "api.example.com"
    for bad in ("", "a..b", "-a.com", "10.0.0.256", "a_b.com", "a" * 64 + ".com", "1.2.3"):
        with pytest.raises(RecordError):
            validate_host(bad)


def test_spec_defaults_and_round_trip() -> None:
    spec = ServiceSpec.parse("{}")
    assert spec == ServiceSpec()
    assert spec.routes_version("anything")
    full = ServiceSpec.parse(
        json.dumps(
            {
                "mode": "http",
                "hosts": ["api.example.com"],
                "path_prefix": "/api",
                "balance": "leastconn",
                "check": {"path": "/health", "interval_ms": 500},
                "active_version": "v2",
                "canary": {"version": "v3", "weight": 10},
                "history": ["v1"],
            }
        )
    )
    assert ServiceSpec.parse(full.to_json()) == full
    assert full.routes_version("v2") and full.routes_version("v3")
    assert not full.routes_version("v1")


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"mode": "udp"}, "mode"),
        ({"mode": "tcp"}, "port"),
        ({"hosts": "a.com"}, "hosts"),
        ({"hosts": ["a com"]}, "hosts"),
        ({"path_prefix": "api"}, "path_prefix"),
        ({"path_prefix": "/a b"}, "path_prefix"),
        ({"balance": "roundrobin\n"}, "balance"),
        ({"check": {"path": "/h\nx"}}, "check.path"),
        ({"check": {"interval_ms": 1}}, "check.interval_ms"),
        ({"canary": {"weight": 10}}, "canary.version"),
        ({"canary": {"version": "v2", "weight": 101}}, "canary.weight"),
        ({"active_version": 'v"2'}, "active_version"),
    ],
)
def test_invalid_specs_name_the_field(obj: dict[str, object], field: str) -> None:
    with pytest.raises(RecordError) as info:
        ServiceSpec.from_dict(obj)
    assert info.value.field == field


def test_reloader_status_round_trip() -> None:
    status = ReloaderStatus(applied_revision=42, node="edge-1", at="2026-01-01T00:00:00Z")
    assert ReloaderStatus.parse(status.to_json()) == status


# -- property tests: whatever is accepted is safe to print into a config line ----------

printable_fields = st.one_of(
    st.text(max_size=80),
    st.text(alphabet=string.printable, max_size=40),
    st.sampled_from(["v1", "v1 x", "v#1", 'v"1', "a\nb", "ok.ok", "\x00", "é"]),
)
json_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), printable_fields
)


def _assert_safe(value: object) -> None:
    if isinstance(value, str):
        assert not (set(value) & DANGEROUS), repr(value)
        assert value.isascii(), repr(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _assert_safe(k)
            _assert_safe(v)


@settings(max_examples=400, deadline=None)
@given(
    host=st.one_of(printable_fields, st.ip_addresses().map(str)),
    port=json_values,
    version=printable_fields,
    node=printable_fields,
    tags=st.dictionaries(printable_fields, printable_fields, max_size=3),
)
def test_accepted_instances_carry_nothing_dangerous(
    host: str, port: object, version: str, node: str, tags: dict[str, str]
) -> None:
    raw = json.dumps({"host": host, "port": port, "version": version, "node": node, "tags": tags})
    try:
        inst = Instance.parse(raw)
    except RecordError:
        return
    for value in (inst.host, inst.version, inst.node, dict(inst.tags)):
        _assert_safe(value)
    assert isinstance(inst.port, int) and 1 <= inst.port <= 65535


@settings(max_examples=300, deadline=None)
@given(text=st.binary(max_size=60) | printable_fields.map(str.encode))
def test_accepted_plain_addresses_carry_nothing_dangerous(text: bytes) -> None:
    try:
        inst = Instance.parse(text)
    except RecordError:
        return
    _assert_safe(inst.host)


@settings(max_examples=300, deadline=None)
@given(
    hosts=st.lists(printable_fields, max_size=3),
    path=printable_fields,
    check_path=printable_fields,
    version=printable_fields,
)
def test_accepted_specs_carry_nothing_dangerous(
    hosts: list[str], path: str, check_path: str, version: str
) -> None:
    raw = {
        "hosts": hosts,
        "path_prefix": path,
        "check": {"path": check_path},
        "active_version": version,
        "canary": {"version": version, "weight": 5},
    }
    try:
        spec = ServiceSpec.from_dict(raw)
    except RecordError:
        return
    for value in (*spec.hosts, spec.path_prefix, spec.active_version):
        _assert_safe(value)
    assert spec.check is not None
    _assert_safe(spec.check.path)


def test_since_is_optional_normalised_to_utc_and_validated() -> None:
    base = {"host": "10.0.0.1", "port": 80}
    assert Instance.from_dict(base).since == ""
    when = Instance.from_dict({**base, "since": "2026-11-30T19:06:41+01:00"}).since
    assert when == "2026-11-30T18:06:41+00:00"
    for bad in ("yesterday", "2026-11-30T18:06:41", 5, "2026-11-30T18:06:41Z" + " " * 30):
        with pytest.raises(RecordError, match="since"):
            Instance.from_dict({**base, "since": bad})
