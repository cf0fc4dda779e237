"""The starting node's legacy unicast query (zmqfabric/discovery/quickquery.py): responders answer
it at once, its answers land in zeroconf's cache like multicast ones, and only answers to our
query, from our scope, are taken. Real zeroconf on loopback."""

from __future__ import annotations

import secrets
import socket
import threading
import time
from typing import Callable, Iterator

import pytest
from zeroconf import DNSOutgoing, DNSPointer, ServiceInfo, Zeroconf

import zmqfabric as zf
from tests.helpers import loopback_zeroconf, wait_until
from zmqfabric.discovery.quickquery import CLASS_IN, TYPE_PTR, QuickQuery, ask_now

LOCAL = ("127.0.0.0/8",)
#: A response's flags: QR and AA.
RESPONSE = 0x8400


@pytest.fixture
def zeroconfs() -> Iterator[Callable[[], Zeroconf]]:
    made: list[Zeroconf] = []

    def make() -> Zeroconf:
        made.append(loopback_zeroconf())
        return made[-1]

    yield make
    for zc in reversed(made):
        zc.close()


def _service_type() -> str:
    """A DNS-SD type of this test alone: other tests' and processes' records never answer it."""
    return f"_zfq{secrets.token_hex(4)}._tcp.local."


def _info(service_type: str, instance: str = "one") -> ServiceInfo:
    return ServiceInfo(service_type, f"{instance}.{service_type}", port=4242,
                       properties={"k": "v"}, server=f"{instance}-host.local.",
                       addresses=[socket.inet_aton("127.0.0.1")], host_ttl=15, other_ttl=15)


def _cached(zc: Zeroconf, service_type: str, instance: str = "one") -> bool:
    info = ServiceInfo(service_type, f"{instance}.{service_type}")
    return info.load_from_cache(zc)


def test_a_responder_answers_at_once_into_the_cache(zeroconfs: Callable[[], Zeroconf]) -> None:
    service_type = _service_type()
    responder = zeroconfs()
    # Returns once its announcements are out; the asker starts after them, with an empty cache.
    responder.register_service(_info(service_type), cooperating_responders=True)
    asker = zeroconfs()
    start = time.monotonic()
    query = ask_now(asker, "127.0.0.1", LOCAL, service_type)
    wait_until(lambda: _cached(asker, service_type), 5.0, "the full record in the asker's cache")
    took = time.monotonic() - start
    assert query.answers >= 1
    # No browser ran, and the responder's own multicast (its registration, just now) would hold
    # a multicast answer back by a second: this one came by unicast, at once.
    assert took < 0.9, f"the answer took {took:.3f} s"
    query.close()


def _inject(zc: Zeroconf, query: QuickQuery, data: bytes, source: str) -> None:
    """Hand ``data`` to the query as if it came from ``source``, in zeroconf's loop."""
    done = threading.Event()

    def deliver() -> None:
        query.datagram_received(data, (source, 5353))
        done.set()

    assert zc.loop is not None
    zc.loop.call_soon_threadsafe(deliver)
    assert done.wait(5.0)


def _response(service_type: str, query_id: int, instance: str) -> bytes:
    out = DNSOutgoing(RESPONSE, multicast=False, id_=query_id)
    out.add_answer_at_time(
        DNSPointer(service_type, TYPE_PTR, CLASS_IN, 15, f"{instance}.{service_type}"), 0)
    return out.packets()[0]


def test_only_answers_to_our_id_from_our_scope_are_taken(
    zeroconfs: Callable[[], Zeroconf],
) -> None:
    service_type = _service_type()
    asker = zeroconfs()
    query = ask_now(asker, "127.0.0.1", LOCAL, service_type)

    def pointers() -> set[str]:
        return {r.alias for r in asker.cache.async_all_by_details(service_type, TYPE_PTR,
                                                                  CLASS_IN)}

    _inject(asker, query, _response(service_type, query.query_id, "far"), "10.9.8.7")
    _inject(asker, query, _response(service_type, query.query_id ^ 1, "wrongid"), "127.0.0.1")
    _inject(asker, query, b"\x00garbage", "127.0.0.1")
    _inject(asker, query, _response(service_type, query.query_id, "near"), "127.0.0.1")
    assert pointers() == {f"near.{service_type}"}
    assert query.answers == 1
    query.close()


def test_a_new_observer_finds_a_provider_at_once_back_to_back() -> None:
    """One-shot clients in a row: from the third on, each asks within a second of the
    provider's last multicast answer, which a responder may not repeat sooner (RFC 6762 §14).
    With the browser alone they took [0.02, 0.22, 0.96, 1.1, ...] s; the quick query's unicast
    answer is not held back."""
    service = f"svc-{secrets.token_hex(3)}"
    provider = zf.Node(f"prov-{secrets.token_hex(3)}")

    @provider.reply(service)
    def _echo(body: object) -> object:
        return body

    try:
        provider.serve_in_background()
        took = []
        for _ in range(5):
            with zf.Node(f"obs-{secrets.token_hex(3)}", advertise=False) as observer:
                start = time.monotonic()
                observer.wait_for_endpoint("rep", service, 5.0)
                took.append(time.monotonic() - start)
                assert observer.request(service, {"n": 1}, timeout=5.0) == {"n": 1}
        assert max(took) < 0.6, f"found the provider after {took} s"
    finally:
        provider.close()
