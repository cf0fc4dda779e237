"""A joining node's one mDNS query (discovery/mdns.py ``browse``; PROTOCOL.md 4.4).

It waits until the calls the node gets have stopped coming (none for JOIN_QUERY_QUIET_S) and it
has checked them (its verifier has no first call waiting or under way), JOIN_QUERY_MAX_WAIT_S at
most, and lists as known answers the nodes it is still
checking, not only the records in its cache: every node that is not a known answer answers the
query by multicast, and every node of the host decodes each answer. At 150 nodes on one host the
query went out while 37 callers were still being checked, and 46 nodes answered it.

The query is read off the loopback's mDNS group by a socket bound to the group address (it
receives multicast only, and sends nothing).
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time

import zmq
from zeroconf import DNSIncoming

import zmqfabric as zf
from tests.helpers import unique, wait_until
from tests.test_verify_load import _control_dealer, _send_control
from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord, encode_txt, instance_name

WAIT = 10.0
MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353


class QueryListener:
    """mDNS queries seen on loopback's group, from a thread: (time, known answers' aliases)."""

    def __init__(self) -> None:
        self.queries: list[tuple[float, set[str]]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._sock.bind((MDNS_GROUP, MDNS_PORT))  # the group's datagrams only
        self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                              struct.pack("4s4s", socket.inet_aton(MDNS_GROUP),
                                          socket.inet_aton("127.0.0.1")))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self._sock.recvfrom(9000)
            except TimeoutError:
                continue
            msg = DNSIncoming(data, addr)
            if msg.valid and msg.is_query():
                aliases = {getattr(a, "alias", "") for a in msg.answers()}
                self.queries.append((time.monotonic(), aliases))

    def listing(self, alias: str) -> list[float]:
        """When queries listing ``alias`` as a known answer were seen."""
        return [t for t, aliases in list(self.queries) if alias in aliases]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self._sock.close()


def test_the_join_query_waits_for_the_calls_and_lists_the_callers_being_checked(
        make_node, raw) -> None:
    """A peer calls the joining node again and again, each time with a new version of its
    record whose control port takes the connection and never answers: the node's first calls
    back keep its verifier busy. No join query goes out while calls come (before: 1-2 s after the
    start, whatever was under way); once they stop, the query goes out, and it lists the peer,
    which is neither verified nor in zeroconf's cache, as a known answer."""
    listener = QueryListener()
    try:
        joiner = make_node("joiner", config=zf.NodeConfig(fabric=unique("quiet"),
                                                           claim_window_s=0))
        mute = raw(zmq.ROUTER)  # takes every connection, answers nothing
        port = mute.bind_to_random_port("tcp://127.0.0.1")
        name, node_id = unique("caller"), secrets.token_hex(8)
        dealer = _control_dealer(raw, joiner)
        started = time.monotonic()
        seq = 0
        while time.monotonic() - started < 3.5:  # past the old query's latest time (2 s)
            seq += 1
            record = NodeRecord(name, node_id, "caller-host", 1, "127.0.0.1",
                                (Endpoint(EndpointKind.CONTROL, "control", port),), seq, None,
                                joiner.config.fabric)
            _send_control(dealer, seq, {"op": "record", "me": {"name": name,
                                                               "txt": encode_txt(record)}})
            time.sleep(0.25)
        stopped = time.monotonic()
        assert joiner.counters.get("join_queries") == 0, "the query went out during the calls"
        alias = instance_name(name, node_id)
        wait_until(lambda: listener.listing(alias), WAIT,
                   "a join query listing the caller being checked")
        assert listener.listing(alias)[0] > stopped
        assert joiner.counters.get("join_queries") == 1
        assert joiner.directory.get(name) is None  # (still unverified: it never answered)
    finally:
        listener.close()
