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

import logging
import secrets
import socket
import time
from typing import Any, Callable

import pytest
from zeroconf import DNSOutgoing, DNSPointer

import zmqfabric as zf
from zmqfabric.constants import SERVICE_TYPE
from zmqfabric.discovery import mdns

from .helpers import unique

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


# --- a starved zeroconf thread ------------------------------------------------------------------


def _starved_register(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Registration runs in zeroconf's loop after ``seconds`` in which that loop runs nothing
    (as a node's loop on a host running hundreds of nodes: it got no CPU)."""
    register = mdns._register

    async def starved(*args: Any) -> Any:
        time.sleep(seconds)  # noqa: ASYNC251 - the point: the loop gets nothing done meanwhile
        return await register(*args)

    monkeypatch.setattr(mdns, "_register", starved)
    monkeypatch.setattr(mdns, "REGISTER_TIMEOUT_S", 0.3)
    monkeypatch.setattr(mdns, "REGISTER_TIMEOUT_MAX_S", 2.0)


def test_a_node_whose_zeroconf_thread_is_starved_still_starts(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        make_node: Callable[..., zf.Node]) -> None:
    """At a load average of 775 (250 nodes starting on 2 cores), a node gave up registering its
    record after 5 s and died in start() with a bare TimeoutError. Past REGISTER_TIMEOUT_S it
    warns and waits on, up to REGISTER_TIMEOUT_MAX_S."""
    _starved_register(monkeypatch, 0.8)
    with caplog.at_level(logging.WARNING, logger="zmqfabric.discovery.mdns"):
        node = make_node("starved")
    assert node.directory.get(node.name) is not None
    assert any("registering its mDNS record has taken" in r.getMessage() and node.name in
               r.getMessage() for r in caplog.records)


def test_a_node_whose_zeroconf_thread_is_stuck_fails_to_start_clearly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _starved_register(monkeypatch, 3.0)
    node = zf.Node(unique("stuck"))
    start = time.monotonic()
    with pytest.raises(zf.FabricTimeoutError, match="could not register its mDNS record"):
        node.start()
    assert time.monotonic() - start < 2.0 + 2.0
    node.close()
