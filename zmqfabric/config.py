"""Node configuration: where a node lives (its scope) and its limits. Frozen, validated once."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

import ifaddr

from . import constants as C
from .core.curve import KeySet
from .core.records import validate_fabric_name
from .core.swim import Timing
from .errors import LocalProtocolError

#: Environment variable naming the interface of the LAN scope (like ``--interface``).
INTERFACE_ENV = "ZMQFABRIC_INTERFACE"
#: Environment variable naming the fabric a node joins (like ``--fabric``).
FABRIC_ENV = "ZMQFABRIC_FABRIC"


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a node binds, where it runs discovery and which peer addresses it accepts.

    The default is this host only: bind 127.0.0.1, mDNS on 127.0.0.1, peers on 127.0.0.0/8.
    """

    address: str = "127.0.0.1"
    networks: tuple[str, ...] = ("127.0.0.0/8",)
    interface: str | None = None

    @classmethod
    def local(cls) -> Scope:
        return cls()

    @classmethod
    def for_interface(cls, interface: str) -> Scope:
        """The scope of one network interface. Raises LocalProtocolError if it has no IPv4."""
        for adapter in ifaddr.get_adapters():
            if adapter.nice_name != interface:
                continue
            for ip in adapter.ips:
                if isinstance(ip.ip, str):
                    net = ipaddress.ip_network(f"{ip.ip}/{ip.network_prefix}", strict=False)
                    return cls(ip.ip, (str(net),), interface)
            raise LocalProtocolError(f"interface {interface!r} has no IPv4 address")
        names = ", ".join(sorted(a.nice_name for a in ifaddr.get_adapters()))
        raise LocalProtocolError(f"no network interface named {interface!r} (have: {names})")

    @classmethod
    def lan(cls) -> Scope:
        """The scope of the interface that carries the default route."""
        return cls.for_interface(default_route_interface())

    @classmethod
    def from_env(cls) -> Scope:
        interface = os.environ.get(INTERFACE_ENV)
        return cls.for_interface(interface) if interface else cls.local()

    @property
    def is_local(self) -> bool:
        return self.interface is None


def fabric_from_env() -> str:
    """The fabric named by ``ZMQFABRIC_FABRIC``, or ``default``."""
    return os.environ.get(FABRIC_ENV) or C.DEFAULT_FABRIC


def default_route_interface() -> str:
    """The interface of the IPv4 default route (Linux). Raises LocalProtocolError if none."""
    try:
        with open("/proc/net/route", encoding="ascii") as routes:
            next(routes)
            for line in routes:
                parts = line.split()
                if len(parts) > 1 and parts[1] == "00000000":
                    return parts[0]
    except OSError as exc:
        raise LocalProtocolError(f"cannot read the routing table: {exc}") from exc
    raise LocalProtocolError("no default route: name the interface with --interface")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Limits and timings of a node; every default lives in :mod:`zmqfabric.constants`."""

    scope: Scope = field(default_factory=Scope)
    max_message_size: int = C.MAX_MESSAGE_SIZE
    hwm: int = C.HWM
    linger_ms: int = C.LINGER_MS
    heartbeat_ivl_ms: int = C.HEARTBEAT_IVL_MS
    heartbeat_timeout_ms: int = C.HEARTBEAT_TIMEOUT_MS
    heartbeat_ttl_ms: int = C.HEARTBEAT_TTL_MS
    record_ttl_s: int = C.RECORD_TTL_S
    request_timeout_s: float = C.REQUEST_TIMEOUT_S
    #: The control endpoint's port; 0 picks a free one. Fix it for nodes others seed from.
    control_port: int = 0
    #: Seed peers "HOST:PORT" (control endpoints) for nodes that mDNS cannot reach.
    peers: tuple[str, ...] = ()
    #: CURVE keys: with them every endpoint is encrypted and only allowed keys get in.
    keys: KeySet | None = None
    #: The fabric this node joins: nodes of other fabrics never see or reach it.
    fabric: str = C.DEFAULT_FABRIC
    #: Liveness (SWIM) timers: probe period and timeouts, suspicion, gossip, formers.
    liveness: Timing = field(default_factory=Timing)
    #: How long a starting advertised node listens for another live node of its name before it
    #: counts as started (s). 0 skips the wait: only for names unique by construction, such as
    #: the CLI's generated ``cli-PID-XXXX``.
    claim_window_s: float = C.CONFLICT_WINDOW_S

    def __post_init__(self) -> None:
        validate_fabric_name(self.fabric)
        if not 0 <= self.control_port <= 65535:
            raise LocalProtocolError(f"control port {self.control_port} is not a port number")
        for peer in self.peers:
            parse_peer(peer)
        if self.max_message_size <= 0 or self.hwm <= 0 or self.linger_ms < 0:
            raise LocalProtocolError("max_message_size and hwm must be > 0, linger_ms >= 0")
        if self.request_timeout_s <= 0 or self.record_ttl_s <= 0:
            raise LocalProtocolError("request_timeout_s and record_ttl_s must be > 0")
        if self.claim_window_s < 0:
            raise LocalProtocolError("claim_window_s must be >= 0")


def parse_peer(peer: str) -> tuple[str, int, str | None]:
    """``"HOST:PORT"`` or ``"KEY@HOST:PORT"`` of a seed peer: an IP address, the peer's control
    port and, for secured fabrics, the peer's CURVE public key (Z85).

    Raises LocalProtocolError for anything else."""
    key, at, address = peer.rpartition("@")
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 < number < 65536 or (at and len(key) != 40):
        raise LocalProtocolError(
            f"peer {peer!r} is not [KEY@]HOST:PORT with an IP address, the peer's control port "
            "and, for secured peers, its 40-character public key"
        )
    return host, number, key or None


def peer_url(peer: str) -> tuple[str, str | None]:
    """(control URL, CURVE key or None) of a seed peer."""
    host, port, key = parse_peer(peer)
    url = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
    return url, key
