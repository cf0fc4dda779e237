"""A record nobody can resolve must not hold up discovery of the others.

Found while measuring one-shot commands: `zmqfabric --timeout 1 pub` failed 20 times in a row
while other tests on the host advertised forged records. ``Discovery._on_change`` resolves each
new record in zeroconf's browser thread and, for a record whose SRV/TXT is not in the cache,
waits up to RESOLVE_TIMEOUT_S (1 s) for an answer; every event behind it waits too. Three bare
PTR records (one multicast packet, from anyone on the LAN) hold up for 3 s what only mDNS
carries, such as a known peer's new endpoint (hellos still introduce newcomers at once).
Measured: 3.01 s. Now a record missing from the cache is asked for in zeroconf's loop
(``AsyncServiceInfo.async_request``, at most MAX_RESOLVING at a time, cancelled on removal), and
the browser thread moves on: measured 0.005-0.007 s.
"""

from __future__ import annotations

import secrets
import socket
import time
from typing import Callable

from zeroconf import DNSOutgoing, DNSPointer

import zmqfabric as zf
from zmqfabric.constants import SERVICE_TYPE

#: A response's flags (QR, AA); PTR; IN.
RESPONSE, TYPE_PTR, CLASS_IN = 0x8400, 12, 1


def multicast_bare_pointers(count: int) -> None:
    """Advertise ``count`` instances by PTR alone: no SRV, TXT or A follows, ever."""
    out = DNSOutgoing(RESPONSE, multicast=True)
    for i in range(count):
        alias = f"ghost{i}@{secrets.token_hex(8)}.{SERVICE_TYPE}"
        out.add_answer_at_time(DNSPointer(SERVICE_TYPE, TYPE_PTR, CLASS_IN, 15, alias), 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
        sock.bind(("127.0.0.1", 0))
        for packet in out.packets():
            sock.sendto(packet, ("224.0.0.251", 5353))


def test_unresolvable_records_do_not_delay_a_peers_new_endpoint(
    make_node: Callable[..., zf.Node], name: Callable[[str], str],
) -> None:
    """A new endpoint of a known peer reaches others only by mDNS (its hello went out before):
    the case of `zmqfabric pub`, whose publisher is made after the node has started."""
    watcher = make_node("watcher")
    peer = make_node("peer")
    watcher.wait_for_node(peer.name, 10.0)
    stream = name("prices")
    multicast_bare_pointers(3)
    start = time.monotonic()
    with peer.publisher(stream):
        watcher.wait_for_endpoint("pub", stream, 10.0)
        took = time.monotonic() - start
    print(f"\nnew endpoint seen after {took:.3f} s")
    assert took < 0.5, f"the watcher saw the new endpoint after {took:.2f} s"
