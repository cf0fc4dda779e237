"""Our own mDNS queries (we run no querying browser: discovery/watch.py).

:func:`requery` is the multicast PTR query that lists what we know as known answers, so only
nodes missing here answer: a node's one query after it joins, and the fabric's occasional
re-query (REQUERY_S). :func:`ask_now` is the query every responder answers at once, an
observer's first look at the fabric:

A browser's own first query waits 20-120 ms (RFC 6762 §5.2), and responders delay multicast
answers to it by another 20-120 ms, or by a second and more when they multicast the same answer
within the last second (§6, §14): on a host where commands run back to back, a one-shot command
waited 1.1-1.5 s to hear of a provider. A query sent from a port other than 5353 is a "legacy
unicast" query (§6.7): responders answer it at once, by unicast to that port, with the full
record (PTR, SRV, TXT, A). :func:`ask_now` sends one such query and hands the answers to
zeroconf's cache, exactly where multicast answers go, so the browser reports them as usual and
they are validated and verified like any other record: this is only a faster hint.

Answers are taken only from addresses in the node's scope, only as responses to our query's id,
and only for QUICK_QUERY_WINDOW_S; then the socket closes. Runs in zeroconf's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from typing import Any, Sequence

from zeroconf import (
    DNSIncoming,
    DNSOutgoing,
    DNSPointer,
    DNSQuestion,
    Zeroconf,
    current_time_millis,
)

from ..constants import QUICK_QUERY_WINDOW_S, SERVICE_TYPE
from ..core.records import address_in_scope, instance_name

log = logging.getLogger(__name__)
#: mDNS: the group and port (RFC 6762 §3), the multicast TTL (§11), a query's flags, PTR, IN.
MDNS_GROUP, MDNS_PORT, MDNS_TTL = "224.0.0.251", 5353, 255
FLAGS_QUERY, TYPE_PTR, CLASS_IN = 0, 12, 1


class QuickQuery(asyncio.DatagramProtocol):
    """The socket of one legacy unicast query and the answers it gets. Thread-safe ``close``."""

    def __init__(self, zc: Zeroconf, networks: Sequence[str], sock: socket.socket) -> None:
        self._zc = zc
        self._sock = sock
        self._networks = tuple(networks)
        #: A fresh id per query: responders drop a packet identical to one seen in the last
        #: 0.8 s, and the id tells our answers from anything else sent to the port.
        self.query_id = 1 + secrets.randbelow(0xFFFF)
        self.answers = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._closed = False

    # --- zeroconf's loop ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        host = str(addr[0])
        if not address_in_scope(host, self._networks):
            return
        msg = DNSIncoming(data, (host, int(addr[1])))
        if not msg.valid or msg.is_query() or msg.id != self.query_id:
            return
        self.answers += 1
        # Where zeroconf's listener puts multicast answers: the cache, then the browsers.
        self._zc.record_manager.async_updates_from_response(msg)

    def error_received(self, exc: Exception) -> None:
        log.debug("quick query socket: %s", exc)

    async def start(self, packets: list[bytes]) -> None:
        """Open the endpoint, send the query, close after QUICK_QUERY_WINDOW_S."""
        if self._closed:
            self._sock.close()
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.create_datagram_endpoint(lambda: self, sock=self._sock)
        except OSError as exc:
            self._sock.close()
            log.debug("quick query not sent: %s", exc)
            return
        transport = self._transport
        if self._closed or transport is None:  # closed before the endpoint was made
            self._close_in_loop()
            return
        for packet in packets:
            transport.sendto(packet, (MDNS_GROUP, MDNS_PORT))
        loop.call_later(QUICK_QUERY_WINDOW_S, self._close_in_loop)

    def _close_in_loop(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()  # closes the socket
            self._transport = None

    # --- any thread -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket (from any thread; idempotent; returns at once)."""
        loop = self._zc.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._close_in_loop)
        else:
            self._closed = True
            self._sock.close()


def ask_now(zc: Zeroconf, address: str, networks: Sequence[str], service_type: str) -> QuickQuery:
    """Send one PTR query for ``service_type`` from an ephemeral port of ``address`` (the scope's
    own address, so it leaves by that interface only) and feed the answers to ``zc``'s cache for
    QUICK_QUERY_WINDOW_S. Returns at once; call ``close()`` when closing ``zc``. Thread-safe.

    Raises OSError when the socket cannot be made (the caller may go on without it: its
    browser's own queries find the same records, later)."""
    loop = zc.loop
    assert loop is not None, "zeroconf is not running"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.bind((address, 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(address))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, MDNS_TTL)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    except OSError:
        sock.close()
        raise

    query = QuickQuery(zc, networks, sock)
    out = DNSOutgoing(FLAGS_QUERY, multicast=False, id_=query.query_id)
    out.add_question(DNSQuestion(service_type, TYPE_PTR, CLASS_IN))
    asyncio.run_coroutine_threadsafe(query.start(out.packets()), loop)
    return query


def requery(zc: Zeroconf, known: list[DNSPointer] | None = None) -> None:
    """Zeroconf's loop: one multicast PTR query with the cached answers, and ``known``, as known
    answers."""
    if zc.done:
        return
    now = current_time_millis()
    out = DNSOutgoing(0)  # flags 0: a query
    out.add_question(DNSQuestion(SERVICE_TYPE, TYPE_PTR, CLASS_IN))
    cached: set[str | None] = set()
    for record in zc.cache.async_all_by_details(SERVICE_TYPE, TYPE_PTR, CLASS_IN):
        if not record.is_stale(now):
            out.add_answer_at_time(record, now)
            cached.add(getattr(record, "alias", None))
    for pointer in known or ():
        if pointer.alias not in cached:
            out.add_answer_at_time(pointer, now)
    zc.async_send(out)


def pointers(nodes: list[tuple[str, str]], ttl: int) -> list[DNSPointer]:
    """PTR records of the nodes ``(name, node id)``, as their own announcements carry them."""
    return [DNSPointer(SERVICE_TYPE, TYPE_PTR, CLASS_IN, ttl, instance_name(name, node_id))
            for name, node_id in nodes]
