"""Unit tests of names and discovery records (:mod:`zmqfabric.core.records`), property-based.

Round trips: every record a node can advertise decodes to itself, however many endpoints it has.
Rejection: whatever TXT properties, addresses or instance names arrive from the network, the
decoders return a valid record or raise RemoteProtocolError, never another exception.
"""

from __future__ import annotations

import ipaddress
import operator
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from zmqfabric.constants import MAX_ENDPOINTS, MAX_TXT_VALUE, SERVICE_TYPE
from zmqfabric.core import records
from zmqfabric.core.records import (
    Endpoint,
    EndpointKind,
    NodeRecord,
    address_in_scope,
    decode_txt,
    encode_txt,
    validate_endpoint_name,
    validate_node_name,
)
from zmqfabric.errors import InvalidNameError, LocalProtocolError, RemoteProtocolError

ROUND_TRIP = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NODE_NAME = r"[a-z0-9][a-z0-9_-]{0,45}"
ENDPOINT_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
ID = "0123456789abcdef"

# --- strategies ------------------------------------------------------------------------------

_LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"
_ALNUM = _LOWER + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _names(first: str, rest: str, max_rest: int) -> st.SearchStrategy[str]:
    """Names of one fixed character class (faster to generate than st.from_regex)."""
    return st.builds(operator.add, st.sampled_from(first), st.text(rest, max_size=max_rest))


node_names = _names(_LOWER, _LOWER + "_-", 45)
endpoint_names = _names(_ALNUM, _ALNUM + "_.-", 63)
node_ids = st.text("0123456789abcdef", min_size=16, max_size=16)
#: Hosts as nodes write them (the runtime truncates the host name to 200 characters).
hosts = _names(_ALNUM, _ALNUM + "_.-", 199)
ports = st.integers(1, 65535)
ipv4 = st.ip_addresses(v=4).filter(lambda ip: not (ip.is_multicast or ip.is_unspecified)).map(str)
endpoints = st.builds(Endpoint, st.sampled_from(list(EndpointKind)), endpoint_names, ports)


def endpoint_sets(min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[tuple[Endpoint, ...]]:
    """Endpoints as a node has them: each (kind, name) once, at most one control endpoint."""
    return st.lists(
        endpoints,
        min_size=min_size,
        max_size=max_size,
        unique_by=lambda e: (e.kind, e.name) if e.kind is not EndpointKind.CONTROL else e.kind,
    ).map(lambda eps: tuple(sorted(eps)))


def node_records(eps: st.SearchStrategy[tuple[Endpoint, ...]]) -> st.SearchStrategy[NodeRecord]:
    return st.builds(
        NodeRecord,
        name=node_names,
        node_id=node_ids,
        host=hosts,
        pid=st.integers(0, 2**31),
        address=ipv4,
        endpoints=eps,
        seq=st.integers(0, 2**32),
        fabric=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True),
    )


def props_of(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    """TXT properties as python-zeroconf hands them over: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in txt.items()}


def good_txt(**override: str | None) -> dict[bytes, bytes | None]:
    txt: dict[str, str | None] = {
        "v": "1",
        "id": ID,
        "host": "host-1",
        "pid": "42",
        "seq": "3",
        "e0": "ctl:control:4000;rep:echo:4001",
    }
    txt.update(override)
    return {k.encode(): (None if v is None else v.encode()) for k, v in txt.items()}


# --- names -----------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(node_names)
@example("a")
@example("0" * 46)
def test_valid_node_names_pass(name: str) -> None:
    assert validate_node_name(name) == name


BAD_NODE_NAMES = [
    "",
    "A",
    "Bad Name!",
    "bad name",
    "-lead",
    "_lead",
    "a" * 64,
    "a.b",
    "a@b",
    "naïve",
    "a\n",
    "a/b",
    "a:b",
    "ümlaut",
    None,
    5,
    b"bytes",
]


@pytest.mark.parametrize("name", BAD_NODE_NAMES, ids=repr)
def test_invalid_node_names_say_why(name: Any) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_node_name(name)
    exc = info.value
    assert isinstance(exc, LocalProtocolError) and isinstance(exc, ValueError)
    assert exc.what == "node" and exc.name == name
    text = str(exc)
    assert text.startswith(f"invalid node name {name!r}: ")
    assert "lowercase letters, digits" in text and "1-46" in text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=70))
def test_node_name_rule_is_exactly_the_documented_pattern(name: str) -> None:
    if re.fullmatch(NODE_NAME, name):
        assert validate_node_name(name) == name
    else:
        with pytest.raises(InvalidNameError):
            validate_node_name(name)


@settings(max_examples=100, deadline=None)
@given(endpoint_names)
@example("A.b-c_d")
def test_valid_endpoint_names_pass(name: str) -> None:
    assert validate_endpoint_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "-x", "a b", "a:b", "a;b", "x" * 65, "é", "a\n", "a/b", None, 3],
    ids=repr,
)
@pytest.mark.parametrize("what", ["endpoint", "service", "stream", "pipeline"])
def test_invalid_endpoint_names_say_why(name: Any, what: str) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_endpoint_name(name, what)
    assert info.value.what == what and info.value.name == name
    assert str(info.value).startswith(f"invalid {what} name {name!r}: use 1-64 letters")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=70))
def test_endpoint_name_rule_is_exactly_the_documented_pattern(name: str) -> None:
    if re.fullmatch(ENDPOINT_NAME, name):
        assert validate_endpoint_name(name) == name
    else:
        with pytest.raises(InvalidNameError):
            validate_endpoint_name(name)


# --- DNS-SD instance names -------------------------------------------------------------------


@ROUND_TRIP
@given(node_names, node_ids)
def test_instance_names_round_trip(name: str, node_id: str) -> None:
    instance = records.instance_name(name, node_id)
    assert instance.endswith("." + SERVICE_TYPE)
    assert records.parse_instance(instance) == (name, node_id)
    assert records.parse_instance(instance.replace(SERVICE_TYPE, SERVICE_TYPE.upper())) == (
        name,
        node_id,
    )
    if hasattr(records, "node_from_instance"):
        assert records.node_from_instance(instance) == name


@pytest.mark.parametrize(
    "instance",
    [
        "",
        SERVICE_TYPE,
        "." + SERVICE_TYPE,
        f"node.{SERVICE_TYPE}",  # no id
        f"node@.{SERVICE_TYPE}",
        f"node@{ID.upper()}.{SERVICE_TYPE}",
        f"node@{ID}0.{SERVICE_TYPE}",
        f"Node@{ID}.{SERVICE_TYPE}",
        f"@{ID}.{SERVICE_TYPE}",
        f"no de@{ID}.{SERVICE_TYPE}",
        f"node@{ID}._http._tcp.local.",
        f"node@{ID}._zmqfabric._udp.local.",
    ],
)
def test_bad_instance_names_are_refused(instance: str) -> None:
    with pytest.raises(RemoteProtocolError):
        records.parse_instance(instance)


@FUZZ
@given(st.text(max_size=90), st.booleans())
def test_parse_instance_fuzz(label: str, typed: bool) -> None:
    instance = f"{label}.{SERVICE_TYPE}" if typed else label
    try:
        name, node_id = records.parse_instance(instance)
    except RemoteProtocolError:
        return
    assert validate_node_name(name) == name and re.fullmatch("[0-9a-f]{16}", node_id)
    if hasattr(records, "node_from_instance"):
        assert records.node_from_instance(instance) == name


# --- TXT records: round trips ----------------------------------------------------------------


def _check_txt_layout(txt: dict[str, str], record: NodeRecord) -> None:
    """The documented layout: v, id, host, pid, seq, fab, and e0..eN of at most 250 bytes each."""
    assert {"v", "id", "host", "pid", "seq", "fab"} <= set(txt)
    assert txt["fab"] == record.fabric
    assert txt["v"] == "1" and txt["id"] == record.node_id and txt["pid"] == str(record.pid)
    e_keys = sorted((k for k in txt if re.fullmatch(r"e\d+", k)), key=lambda k: int(k[1:]))
    assert e_keys == [f"e{i}" for i in range(len(e_keys))]
    assert set(txt) == {"v", "id", "host", "pid", "seq", "fab", *e_keys}
    items = [item for k in e_keys for item in txt[k].split(";")]
    assert all(len(txt[k].encode()) <= MAX_TXT_VALUE for k in e_keys)
    expected = [f"{e.kind.value}:{e.name}:{e.port}" for e in sorted(record.endpoints)]
    assert items == expected
    for key, value in txt.items():  # a DNS character-string holds "key=value" in 255 bytes
        assert len(key.encode()) + 1 + len(value.encode()) <= 255


@ROUND_TRIP
@given(node_records(endpoint_sets()))
def test_txt_round_trip(record: NodeRecord) -> None:
    txt = encode_txt(record)
    _check_txt_layout(txt, record)
    assert decode_txt(record.name, [record.address], props_of(txt)) == record


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(node_records(endpoint_sets(min_size=30, max_size=MAX_ENDPOINTS)))
def test_txt_round_trip_with_many_endpoints_split_over_keys(record: NodeRecord) -> None:
    txt = encode_txt(record)
    _check_txt_layout(txt, record)
    assert "e1" in txt or sum(len(f"{e.name}") + 12 for e in record.endpoints) <= MAX_TXT_VALUE
    assert decode_txt(record.name, [record.address], props_of(txt)) == record


def _many(n: int, name_len: int = 60) -> tuple[Endpoint, ...]:
    return tuple(
        sorted(
            Endpoint(EndpointKind.REPLY, f"s{i:03d}".ljust(name_len, "x"), 1000 + i)
            for i in range(n)
        )
    )


def test_the_most_endpoints_a_record_may_carry() -> None:
    record = NodeRecord("big", ID, "h", 1, "127.0.0.1", _many(MAX_ENDPOINTS), 1)
    txt = encode_txt(record)
    assert len([k for k in txt if k.startswith("e")]) > 30  # long names: about 3 per key
    _check_txt_layout(txt, record)
    assert decode_txt("big", ["127.0.0.1"], props_of(txt)) == record


def test_too_many_endpoints_cannot_be_advertised_nor_decoded() -> None:
    record = NodeRecord("big", ID, "h", 1, "127.0.0.1", _many(MAX_ENDPOINTS + 1, 4), 1)
    with pytest.raises(LocalProtocolError, match=str(MAX_ENDPOINTS)):
        encode_txt(record)
    items = [f"rep:s{i}:{1000 + i}" for i in range(MAX_ENDPOINTS + 1)]
    chunks = {f"e{i}": ";".join(items[j : j + 10]) for i, j in enumerate(range(0, len(items), 10))}
    with pytest.raises(RemoteProtocolError, match="more than"):
        decode_txt("big", ["127.0.0.1"], good_txt(**chunks))
    del chunks[f"e{len(chunks) - 1}"]  # one key fewer: within the limit
    assert len(decode_txt("big", ["127.0.0.1"], good_txt(**chunks)).endpoints) <= MAX_ENDPOINTS


def test_every_txt_entry_fits_a_dns_character_string() -> None:
    record = NodeRecord("n", ID, "h" * 253, 1, "127.0.0.1", (), 1)
    try:
        txt = encode_txt(record)
    except LocalProtocolError:
        return
    assert all(len(k) + 1 + len(v.encode()) <= 255 for k, v in txt.items())


# --- TXT records: rejection ------------------------------------------------------------------

BAD_TXT = {
    "no version value": good_txt(v=None),
    "version 2": good_txt(v="2"),
    "version missing": {k: v for k, v in good_txt().items() if k != b"v"},
    "id uppercase": good_txt(id=ID.upper()),
    "id short": good_txt(id=ID[:-1]),
    "id long": good_txt(id=ID + "0"),
    "id not hex": good_txt(id="0123456789abcdeg"),
    "id missing": {k: v for k, v in good_txt().items() if k != b"id"},
    "host empty": good_txt(host=""),
    "host with space": good_txt(host="my host"),
    "host leading dot": good_txt(host=".host"),
    "pid negative": good_txt(pid="-1"),
    "pid float": good_txt(pid="1.5"),
    "pid too big": good_txt(pid=str(2**31 + 1)),
    "pid 11 digits": good_txt(pid="00000000001"),
    "pid empty": good_txt(pid=""),
    "pid missing": {k: v for k, v in good_txt().items() if k != b"pid"},
    "seq text": good_txt(seq="x"),
    "seq too big": good_txt(seq=str(2**32 + 1)),
    "endpoint kind not a word": good_txt(e0="X-Y:a:4000"),
    "endpoint two parts": good_txt(e0="rep:a"),
    "endpoint four parts": good_txt(e0="rep:a:1:2"),
    "endpoint bad name": good_txt(e0="rep:bad name:4000"),
    "endpoint empty name": good_txt(e0="rep::4000"),
    "endpoint port 0": good_txt(e0="ctl:control:4000;rep:echo:0"),
    "endpoint port 65536": good_txt(e0="rep:echo:65536"),
    "endpoint port negative": good_txt(e0="rep:echo:-1"),
    "endpoint port empty": good_txt(e0="rep:echo:"),
    "endpoint empty item": good_txt(e0="rep:echo:1;;rep:b:2"),
    "value not utf-8": good_txt(host=None) | {b"host": b"\xff\xfe"},
    "key not ascii": good_txt() | {"é".encode(): b"1"},
    "value oversized": good_txt(e0=";".join(f"rep:s{i}:{i + 1}" for i in range(40))),
}


def test_an_endpoint_of_an_unknown_kind_is_skipped_not_fatal() -> None:
    """Forward compatibility: a newer node's new endpoint kind does not hide the whole node."""
    record = decode_txt("peer", ["127.0.0.1"], good_txt(e0="ctl:control:4000;xyz:a:4001"))
    assert [(ep.kind.value, ep.port) for ep in record.endpoints] == [("ctl", 4000)]


@pytest.mark.parametrize("props", BAD_TXT.values(), ids=list(BAD_TXT))
def test_bad_txt_records_are_refused(props: dict[bytes, bytes | None]) -> None:
    with pytest.raises(RemoteProtocolError, match="record 'peer'"):
        decode_txt("peer", ["127.0.0.1"], props)


@pytest.mark.parametrize(
    "addresses",
    [[], ["not-an-ip"], ["224.0.0.251"], ["0.0.0.0"], ["::"], ["ff02::fb"], ["127.0.0.1/8"], [""]],
    ids=repr,
)
def test_bad_addresses_are_refused(addresses: list[str]) -> None:
    with pytest.raises(RemoteProtocolError, match="address"):
        decode_txt("peer", addresses, good_txt())


def test_good_txt_decodes() -> None:
    record = decode_txt("peer", ["127.0.0.1", "10.0.0.1"], good_txt())
    assert record == NodeRecord(
        "peer",
        ID,
        "host-1",
        42,
        "127.0.0.1",
        (
            Endpoint(EndpointKind.CONTROL, "control", 4000),
            Endpoint(EndpointKind.REPLY, "echo", 4001),
        ),
        3,
    )
    assert record.url(record.endpoints[1]) == "tcp://127.0.0.1:4001"
    assert record.control == Endpoint(EndpointKind.CONTROL, "control", 4000)
    assert record.find(EndpointKind.REPLY, "echo") == record.endpoints[1]
    assert record.find(EndpointKind.STREAM, "echo") is None


@pytest.mark.parametrize(
    "field, value",
    [("pid", "²"), ("seq", "¹"), ("port", "³"), ("pid", "٣"), ("port", "４０００")],
    ids=["pid-superscript", "seq-superscript", "port-superscript", "pid-arabic", "port-fullwidth"],
)
def test_only_ascii_digits_are_numbers(field: str, value: str) -> None:
    props = good_txt(e0=f"rep:echo:{value}") if field == "port" else good_txt(**{field: value})
    with pytest.raises(RemoteProtocolError):
        decode_txt("peer", ["127.0.0.1"], props)


@pytest.mark.parametrize("e0", ["rep:echo:4001;rep:echo:4002", "ctl:control:4000;ctl:other:4001"])
def test_an_endpoint_listed_twice_is_refused(e0: str) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_txt("peer", ["127.0.0.1"], good_txt(e0=e0))


_KEYS = [b"v", b"id", b"host", b"pid", b"seq", b"e0", b"e1", b"e2"]
#: Text values for fuzzing, non-ASCII digits ("²", "٣", "４") included.
_texts = st.text(max_size=40)
_values = (
    st.none()
    | st.binary(max_size=40)
    | _texts.map(str.encode)
    | st.sampled_from(
        [b"1", ID.encode(), b"host", b"0", b"65535", b"rep:a:1", b"ctl:control:9;pub:s:8"]
    )
)


def _check_record(record: NodeRecord, node: str) -> None:
    assert isinstance(record, NodeRecord) and record.name == node
    assert re.fullmatch("[0-9a-f]{16}", record.node_id)
    assert 0 <= record.pid <= 2**31 and 0 <= record.seq <= 2**32
    assert ipaddress.ip_address(record.address)
    assert len(record.endpoints) <= MAX_ENDPOINTS
    assert list(record.endpoints) == sorted(set(record.endpoints))
    for ep in record.endpoints:
        assert isinstance(ep.kind, EndpointKind) and 1 <= ep.port <= 65535
        assert validate_endpoint_name(ep.name) == ep.name


@FUZZ
@given(
    st.dictionaries(st.sampled_from(_KEYS) | st.binary(max_size=6), _values, max_size=8),
    st.lists(
        st.sampled_from(["127.0.0.1", "::1", "x", "224.0.0.1"]) | st.text(max_size=12), max_size=2
    ),
)
def test_decode_txt_fuzz(props: dict[bytes, bytes | None], addresses: list[str]) -> None:
    try:
        record = decode_txt("peer", addresses, props)
    except RemoteProtocolError:
        return
    _check_record(record, "peer")


@FUZZ
@given(
    node_records(endpoint_sets(max_size=20)),
    st.lists(st.tuples(st.sampled_from(_KEYS), _values), min_size=1, max_size=3),
)
def test_decode_txt_fuzz_mutated_records(
    record: NodeRecord, edits: list[tuple[bytes, bytes | None]]
) -> None:
    props: dict[bytes, bytes | None] = dict(props_of(encode_txt(record)))
    for key, value in edits:
        props[key] = value
    try:
        decoded = decode_txt(record.name, [record.address], props)
    except RemoteProtocolError:
        return
    _check_record(decoded, record.name)


def test_decoders_reject_oversized_values_before_parsing() -> None:
    big = b"1" * (MAX_TXT_VALUE + 6)
    with pytest.raises(RemoteProtocolError, match="oversized"):
        decode_txt("peer", ["127.0.0.1"], good_txt() | {b"pid": big})


# --- scope -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, networks, inside",
    [
        ("127.0.0.1", ("127.0.0.0/8",), True),
        ("127.255.255.254", ("127.0.0.0/8",), True),
        ("192.0.2.1", ("127.0.0.0/8",), False),
        ("128.0.0.1", ("127.0.0.0/8",), False),
        ("10.0.0.5", ("192.168.0.0/16", "10.0.0.0/24"), True),
        ("10.0.1.5", ("10.0.0.7/24",), False),  # host bits in the network are fine
        ("10.0.0.9", ("10.0.0.7/24",), True),
        ("::1", ("127.0.0.0/8",), False),  # another family is simply outside
        ("::ffff:127.0.0.1", ("127.0.0.0/8",), False),
        ("127.0.0.1", (), False),
    ],
)
def test_address_in_scope(address: str, networks: tuple[str, ...], inside: bool) -> None:
    assert address_in_scope(address, networks) is inside


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_address_in_scope_is_the_prefix_match(address: int, network: int, prefix: int) -> None:
    mask = (2**32 - 1) ^ (2 ** (32 - prefix) - 1)
    net = f"{ipaddress.IPv4Address(network)}/{prefix}"
    expected = (address & mask) == (network & mask)
    assert address_in_scope(str(ipaddress.IPv4Address(address)), (net,)) is expected


# --- fabrics ---------------------------------------------------------------------------------


def test_a_record_without_fab_is_of_the_default_fabric() -> None:
    assert decode_txt("n", ["127.0.0.1"], good_txt()).fabric == "default"
    assert decode_txt("n", ["127.0.0.1"], good_txt(fab="blue-2")).fabric == "blue-2"


@pytest.mark.parametrize("fab", ["", "Blue", "-x", "a" * 33, "a b", "\x1b[31m"])
def test_a_bad_fabric_name_is_refused(fab: str) -> None:
    with pytest.raises(RemoteProtocolError, match="fabric"):
        decode_txt("n", ["127.0.0.1"], good_txt(fab=fab))
