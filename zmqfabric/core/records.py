"""Names and discovery records: validation and the DNS-SD TXT encoding. Pure: no IO.

The specification is ``docs/PROTOCOL.md``, section 4 (and section 3: records are hints, believed
only once the node itself confirms them). In short: a node registers one DNS-SD service
``<node>@<node id>._zmqfabric._tcp.local.`` whose SRV target is ``zf-<node id>.local.``, whose
SRV port is its control endpoint's and whose A record is the one address all its endpoints are
bound to. Its TXT record has ``v`` (``1``), ``id`` (16 lowercase hex digits, as in the instance
name), ``host``, ``pid`` and ``seq`` (all REQUIRED: a record missing one is refused), ``fab``
(the fabric; absent means ``default``), ``ck`` (secured nodes: the CURVE public key, Z85) and the
endpoints ``kind:name:port`` joined by ``;`` in ``e0``, ``e1``... of at most 250 bytes each
(an item is never split). Exactly one ``ctl`` endpoint, whose port is the SRV port. Kinds:
``ctl``, ``rep``, ``pub``, ``pull``, ``task``, and the device front ends ``queue``, ``fwd``,
``strm``; readers skip unknown kinds.

Endpoints carry only ports: the address is always the record's own A address. A record is only a
hint: before any of it is used, the node it names must confirm it from that address, over its
control endpoint and (secured fabrics) a CURVE handshake with the record's key (control op
``record``, checked by :func:`confirm_record`). So a record cannot point the fabric at a third
host (at most that host's claimed control port is asked, a bounded number of times), nor claim a
name, key or endpoints its advertiser does not hold. Everything read from the network is
validated here and refused with :class:`RemoteProtocolError` when it does not fit.
"""


from __future__ import annotations

import enum
import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Final, Mapping

from ..constants import (
    ADDRESS_CACHE,
    DEFAULT_FABRIC,
    MAX_ENDPOINTS,
    MAX_TXT_VALUE,
    SERVICE_TYPE,
)
from ..errors import InvalidNameError, LocalProtocolError, RemoteProtocolError
from .curve import Z85_KEY

RECORD_VERSION: Final = "1"
#: At most 46 characters: the DNS label "<name>@<16-digit id>" may hold 63 bytes.
_NODE_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,45}\Z")
_ENDPOINT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_FABRIC: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}\Z")
_NODE_ID: Final = re.compile(r"[0-9a-f]{16}\Z")
#: Host names up to 200 characters: "host=" plus the name must fit a DNS character-string (255).
_HOST: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}\Z")
_DIGITS: Final = re.compile(r"[0-9]{1,10}\Z")
_KIND: Final = re.compile(r"[a-z][a-z0-9]{0,15}\Z")


class EndpointKind(str, enum.Enum):
    CONTROL = "ctl"
    REPLY = "rep"
    STREAM = "pub"
    PIPELINE = "pull"
    #: Device front ends: a service, stream or pipeline relayed by a device node. Clients reach
    #: them only when told to (``via=``), so nothing arrives twice through device and direct.
    QUEUE = "queue"
    FORWARDER = "fwd"
    STREAMER = "strm"
    #: A worker's reliable task queue (ROUTER; producers connect a DEALER to each worker).
    TASK = "task"

    @property
    def noun(self) -> str:
        return _NOUNS[self]


_NOUNS: Final = {
    EndpointKind.CONTROL: "control endpoint",
    EndpointKind.REPLY: "service",
    EndpointKind.STREAM: "stream",
    EndpointKind.PIPELINE: "pipeline",
    EndpointKind.QUEUE: "queue device",
    EndpointKind.FORWARDER: "forwarder device",
    EndpointKind.STREAMER: "streamer device",
    EndpointKind.TASK: "task",
}

_KNOWN_KINDS: Final = frozenset(kind.value for kind in EndpointKind)

#: The device front end that relays each kind of endpoint (what ``via=`` connects to).
VIA_KIND: Final = {
    EndpointKind.REPLY: EndpointKind.QUEUE,
    EndpointKind.STREAM: EndpointKind.FORWARDER,
    EndpointKind.PIPELINE: EndpointKind.STREAMER,
}


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    kind: EndpointKind
    name: str
    port: int


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What the fabric knows about one node, as advertised."""

    name: str
    node_id: str
    host: str
    pid: int
    address: str
    endpoints: tuple[Endpoint, ...]
    seq: int = 0
    curve_key: str | None = None
    fabric: str = DEFAULT_FABRIC

    def url(self, endpoint: Endpoint) -> str:
        return f"tcp://{_url_host(self.address)}:{endpoint.port}"

    def find(self, kind: EndpointKind, name: str) -> Endpoint | None:
        for ep in self.endpoints:
            if ep.kind is kind and ep.name == name:
                return ep
        return None

    @property
    def control(self) -> Endpoint | None:
        for ep in self.endpoints:
            if ep.kind is EndpointKind.CONTROL:
                return ep
        return None


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def validate_node_name(name: object) -> str:
    """Return ``name`` if it is a valid node name; raise InvalidNameError otherwise."""
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise InvalidNameError(
            "node", name, "use 1-46 lowercase letters, digits, '-' or '_', starting with a letter "
            "or digit"
        )
    return name


def validate_fabric_name(name: object) -> str:
    """A fabric name: lowercase letters, digits, ``-`` and ``_``, at most 32 characters. Raises
    InvalidNameError."""
    if not isinstance(name, str) or not _FABRIC.match(name):
        raise InvalidNameError(
            "fabric", name, "use lowercase letters, digits, '-' and '_', at most 32 characters"
        )
    return name


def validate_endpoint_name(name: object, what: str = "endpoint") -> str:
    """Return ``name`` if it is a valid endpoint name; raise InvalidNameError otherwise."""
    if not isinstance(name, str) or not _ENDPOINT_NAME.match(name):
        raise InvalidNameError(
            what, name, "use 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit"
        )
    return name


def instance_name(node: str, node_id: str) -> str:
    """The DNS-SD instance name of a node: ``<node>@<node id>``, unique per node start, so two
    nodes claiming one name (a conflict, or a restart while the old record is cached) never
    overwrite each other's records; the fabric sorts them out by id."""
    return f"{node}@{node_id}.{SERVICE_TYPE}"


def parse_instance(instance: str) -> tuple[str, str]:
    """(node name, node id) of a DNS-SD instance name. Raises RemoteProtocolError."""
    suffix = "." + SERVICE_TYPE
    if not instance.lower().endswith(suffix.lower()):
        raise RemoteProtocolError(f"record {instance[:120]!r} is not of type {SERVICE_TYPE}")
    label = instance[: -len(suffix)]
    name, sep, node_id = label.partition("@")
    if not sep or not _NODE_ID.match(node_id):
        raise RemoteProtocolError(f"record {instance[:120]!r}: instance is not <node>@<node id>")
    try:
        return validate_node_name(name), node_id
    except InvalidNameError as exc:
        raise RemoteProtocolError(f"record has a bad node name: {exc}") from exc


def node_from_instance(instance: str) -> str:
    """The node name of a DNS-SD instance name. Raises RemoteProtocolError."""
    return parse_instance(instance)[0]


def server_name(node_id: str) -> str:
    """The SRV target host name of a node: unique per node start."""
    return f"zf-{node_id}.local."


# --- TXT <-> record --------------------------------------------------------------------------


def encode_txt(record: NodeRecord) -> dict[str, str]:
    """The TXT properties of ``record``. Raises LocalProtocolError when it cannot be advertised."""
    if not _HOST.match(record.host):
        raise LocalProtocolError(f"host name {record.host[:80]!r} cannot be advertised")
    if len(record.endpoints) > MAX_ENDPOINTS:
        raise LocalProtocolError(
            f"node {record.name!r} has {len(record.endpoints)} endpoints; at most {MAX_ENDPOINTS} "
            "can be advertised"
        )
    txt = {
        "v": RECORD_VERSION,
        "id": record.node_id,
        "host": record.host,
        "pid": str(record.pid),
        "seq": str(record.seq),
        "fab": record.fabric,
    }
    if record.curve_key:
        txt["ck"] = record.curve_key
    chunk: list[str] = []
    size = 0
    index = 0
    for ep in sorted(record.endpoints):
        item = f"{ep.kind.value}:{ep.name}:{ep.port}"
        if chunk and size + 1 + len(item) > MAX_TXT_VALUE:
            txt[f"e{index}"] = ";".join(chunk)
            index += 1
            chunk, size = [], 0
        size += len(item) + (1 if chunk else 0)
        chunk.append(item)
    if chunk:
        txt[f"e{index}"] = ";".join(chunk)
    return txt


def decode_txt(
    node: str, addresses: list[str], properties: Mapping[bytes, bytes | None]
) -> NodeRecord:
    """Validate a peer's advertised record. Raises RemoteProtocolError for anything off."""
    props: dict[str, str] = {}
    for key, value in properties.items():
        if value is None or len(value) > MAX_TXT_VALUE + 5:
            raise RemoteProtocolError(
                f"record {node!r}: TXT key {key!r} has no or an oversized value"
            )
        try:
            props[key.decode("ascii")] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError(f"record {node!r}: TXT entry is not text") from exc
    version = props.get("v")
    if version != RECORD_VERSION:
        raise RemoteProtocolError(f"record {node!r}: unsupported record version {version!r}")
    node_id = props.get("id", "")
    if not _NODE_ID.match(node_id):
        raise RemoteProtocolError(f"record {node!r}: bad node id {node_id!r}")
    host = props.get("host", "")
    if not _HOST.match(host):
        raise RemoteProtocolError(f"record {node!r}: bad host {host[:64]!r}")
    pid = _int_field(node, "pid", props.get("pid"), 0, 2**31)
    seq = _int_field(node, "seq", props.get("seq"), 0, 2**32)
    if len(addresses) < 1:
        raise RemoteProtocolError(f"record {node!r}: no address")
    address = _valid_address(node, addresses[0])
    endpoints = _decode_endpoints(node, props)
    curve_key = props.get("ck")
    if curve_key is not None and not Z85_KEY.match(curve_key):
        raise RemoteProtocolError(f"record {node!r}: bad CURVE key {curve_key[:48]!r}")
    fabric = props.get("fab", DEFAULT_FABRIC)
    if not _FABRIC.match(fabric):
        raise RemoteProtocolError(f"record {node!r}: bad fabric name {fabric[:40]!r}")
    return NodeRecord(node, node_id, host, pid, address, endpoints, seq, curve_key, fabric)


def _decode_endpoints(node: str, props: Mapping[str, str]) -> tuple[Endpoint, ...]:
    items: list[str] = []
    index = 0
    while f"e{index}" in props:
        items.extend(props[f"e{index}"].split(";"))
        index += 1
        if len(items) > MAX_ENDPOINTS:
            raise RemoteProtocolError(f"record {node!r}: more than {MAX_ENDPOINTS} endpoints")
    endpoints: set[Endpoint] = set()
    for item in items:
        parts = item.split(":")
        if len(parts) != 3:
            raise RemoteProtocolError(f"record {node!r}: bad endpoint {item[:80]!r}")
        kind_s, name, port_s = parts
        port = _int_field(node, "port", port_s, 1, 65535)
        try:
            validate_endpoint_name(name)
        except InvalidNameError as exc:
            raise RemoteProtocolError(f"record {node!r}: bad endpoint {item[:80]!r}") from exc
        if not _KIND.match(kind_s):
            raise RemoteProtocolError(f"record {node!r}: bad endpoint kind {kind_s[:20]!r}")
        if kind_s not in _KNOWN_KINDS:
            continue  # a kind from a newer version: the rest of the record is still good
        endpoints.add(Endpoint(EndpointKind(kind_s), name, port))
    keys = [(ep.kind, ep.name) for ep in endpoints]
    controls = [ep for ep in endpoints if ep.kind is EndpointKind.CONTROL]
    if len(set(keys)) != len(keys) or len(controls) > 1:
        raise RemoteProtocolError(f"record {node!r}: an endpoint is listed twice")
    return tuple(sorted(endpoints))


def _int_field(node: str, key: str, value: str | None, low: int, high: int) -> int:
    if value is None or not _DIGITS.match(value) or not low <= int(value) <= high:
        raise RemoteProtocolError(f"record {node!r}: bad {key} {str(value)[:20]!r}")
    return int(value)


def _valid_address(node: str, address: str) -> str:
    try:
        ip, usable = _parsed_address(address)
    except ValueError as exc:
        raise RemoteProtocolError(f"record {node!r}: bad address {address[:64]!r}") from exc
    if not usable:
        raise RemoteProtocolError(f"record {node!r}: address {address} cannot host endpoints")
    return ip


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def _parsed_address(address: str) -> tuple[str, bool]:
    """``address`` written canonically, and whether it can host endpoints (not multicast nor
    unspecified). Raises ValueError. Cached: every node of a host has the host's address, and
    parsing it (Python's ipaddress) was a sizeable part of each record decoded in a join."""
    ip = ipaddress.ip_address(address)
    return str(ip), not (ip.is_multicast or ip.is_unspecified)


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def address_in_scope(address: str, networks: tuple[str, ...]) -> bool:
    """True when ``address`` lies in one of ``networks`` (CIDR strings). Raises ValueError for
    a malformed address. Cached (see ``_parsed_address``)."""
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)


def confirm_record(hint: NodeRecord, answer: object) -> NodeRecord:
    """The record a node gave for itself (control op ``record``: ``{"name": str, "txt": {str:
    str}}``), asked at ``hint``'s address and control port, checked against the hint: the same
    name, id, key, fabric and control port, or RemoteProtocolError. Its seq and endpoints win
    over the hint's (the node itself is the truth); its address is the hint's, where it
    answered."""
    if not isinstance(answer, dict):
        raise RemoteProtocolError("its record answer is not a map")
    name, txt = answer.get("name"), answer.get("txt")
    if not isinstance(txt, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in txt.items()
    ):
        raise RemoteProtocolError("its record answer carries no TXT map of strings")
    try:
        validate_node_name(name)
    except InvalidNameError as exc:
        raise RemoteProtocolError(f"its record answer has a bad node name: {exc}") from exc
    props = {k.encode(): v.encode() for k, v in txt.items()}
    record = decode_txt(str(name), [hint.address], props)
    if (record.name, record.node_id) != (hint.name, hint.node_id):
        raise RemoteProtocolError(
            f"its control endpoint answers as node {record.name!r} (id {record.node_id})")
    if record.curve_key != hint.curve_key or record.fabric != hint.fabric:
        raise RemoteProtocolError("its node answers with another key or fabric")
    control, claimed = record.control, hint.control
    if control is None or claimed is None or control.port != claimed.port:
        raise RemoteProtocolError("its node answers with another control port")
    return record
