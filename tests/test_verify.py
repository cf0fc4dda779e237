"""Hints are verified with the node itself; requests name their service; bodies are budgeted.

Unit tests of the pure pieces (core/budget.py, the service name in core/wire.py) and loopback
tests of verification (discovery/verify.py) with real sockets and real zeroconf. The attacks
themselves, across network namespaces, are in tests/attacks/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import msgpack
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

import zmqfabric as zf
from tests.helpers import forged_service_info, loopback_zeroconf, unique, wait_until
from zmqfabric.constants import DECODE_ALLOWANCE, DECODE_EXPANSION, SERVICE_TYPE
from zmqfabric.core import wire
from zmqfabric.core.budget import expansion_cost
from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord, confirm_record, encode_txt
from zmqfabric.errors import RemoteProtocolError
from zmqfabric.security import keys

WAIT = 10.0


# --- decoding budget (pure) --------------------------------------------------------------------


def _cost(value: Any) -> int:
    return expansion_cost(msgpack.packb(value), DECODE_EXPANSION, DECODE_ALLOWANCE)


@pytest.mark.parametrize("value", [
    {"t": "x" * 100_000},
    {"b": b"\x00" * 100_000},
    [1.5] * 20_000,
    list(range(30_000)),
    [{"id": 123456, "name": "abcdefgh", "price": 1.5}] * 3_000,
    ["ab"] * 30_000,
    [{"a": 1, "b": 2, "c": 3}] * 10_000,
])
def test_ordinary_bodies_fit_the_budget(value: Any) -> None:
    data = msgpack.packb(value)
    assert len(data) > 16 * 1024
    assert _cost(value) > 0
    assert wire.unpack_body(data) == value


@pytest.mark.parametrize("crafted", [
    b"\xdd" + (200_000).to_bytes(4, "big") + b"\x90" * 200_000,  # empty arrays
    b"\xdd" + (200_000).to_bytes(4, "big") + b"\x80" * 200_000,  # empty maps
    b"\xdd" + (200_000).to_bytes(4, "big") + b"\xe0" * 200_000,  # uncached negative integers
    b"\xdd" + (100_000).to_bytes(4, "big") + b"\xd4\x01\x00" * 100_000,  # extension types
])
def test_crafted_bodies_are_refused_before_decoding(crafted: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(RemoteProtocolError, match="times its size"):
        wire.unpack_body(crafted)
    assert time.perf_counter() - start < 0.05  # stopped early, not decoded


@given(st.binary(max_size=64))
def test_the_budget_never_raises_on_garbage(data: bytes) -> None:
    expansion_cost(data, DECODE_EXPANSION, 0)


# --- the node's answer against the hint (pure) ---------------------------------------------------


def _record(**changes: Any) -> NodeRecord:
    base = NodeRecord("alpha", "0123456789abcdef", "host", 1, "198.18.0.1",
                      (Endpoint(EndpointKind.CONTROL, "control", 5000),
                       Endpoint(EndpointKind.REPLY, "echo", 5001)), 3, None, "default")
    return dataclasses.replace(base, **changes)


def test_the_answer_wins_over_the_hint() -> None:
    truth = _record()
    hint = _record(seq=2**32, endpoints=(*truth.endpoints, Endpoint(EndpointKind.REPLY, "x", 9)))
    confirmed = confirm_record(hint, {"name": "alpha", "txt": encode_txt(truth)})
    assert confirmed == truth  # its seq and endpoints, at the hint's address


@pytest.mark.parametrize("liar, why", [
    (_record(name="beta"), "answers as node 'beta'"),
    (_record(node_id="fedcba9876543210"), "answers as node 'alpha'"),
    (_record(curve_key="x" * 40), "another key"),
    (_record(fabric="other"), "another key or fabric"),
    (_record(endpoints=(Endpoint(EndpointKind.CONTROL, "control", 5999),)), "control port"),
])
def test_an_answer_that_contradicts_the_hint_is_refused(liar: NodeRecord, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        confirm_record(_record(), {"name": liar.name, "txt": encode_txt(liar)})


@pytest.mark.parametrize("answer", [None, [], {"name": "alpha"}, {"name": "A B", "txt": {}},
                                    {"name": "alpha", "txt": {"v": 1}}])
def test_a_malformed_answer_is_refused(answer: object) -> None:
    with pytest.raises(RemoteProtocolError):
        confirm_record(_record(), answer)


# --- the service a request names (pure) --------------------------------------------------------


def test_a_request_header_names_its_service() -> None:
    tail = wire.service_tail("echo")
    header = wire.name_service(wire.pack_header(wire.Kind.REQUEST, 7, 1.0), tail)
    assert header.hex().startswith("950211cf0000000000000007cb")  # a header frame, version 2
    assert header.endswith(bytes.fromhex("81a3737663a46563686f"))
    assert wire.unpack_header(header).headers == {"svc": "echo"}
    one = wire.pack_message(wire.Kind.REQUEST, 7, 1.0, wire.pack_body("x"), tail)
    assert wire.canonical_request(one, {"svc": "echo"}) == (7, "x")
    assert wire.canonical_request(one, {"svc": "other"}) is None
    plain = wire.pack_message(wire.Kind.REQUEST, 8, 1.0, wire.pack_body("y"))
    assert wire.canonical_request(plain, {"svc": "echo"}) == (8, "y")  # no name: any takes it
    raw = wire.name_service(wire.pack_header(wire.Kind.REQUEST, 9, 1.0, wire.RAW_HEADERS), tail)
    assert wire.unpack_header(raw).headers == {"enc": "raw", "svc": "echo"}
    with pytest.raises(RemoteProtocolError, match="reached 'admin'"):
        wire.parse_request([header, msgpack.packb(1)], "admin")
    assert wire.parse_request([header, msgpack.packb(1)], "echo")[1] == 1


def test_a_request_for_another_service_is_refused_with_a_matching_reply(raw) -> None:
    node = zf.Node(unique("svc"))
    called = []

    @node.reply("admin")
    def admin(body: Any) -> Any:  # pragma: no cover - must not run
        called.append(body)
        return "admin"

    with node:
        node.serve_in_background()
        _ask_admin_for_echo(node, raw, called)


def _ask_admin_for_echo(node: zf.Node, raw: Any, called: list[Any]) -> None:
    port = node.record.find(EndpointKind.REPLY, "admin").port
    dealer = raw(zmq.DEALER, connect=f"tcp://127.0.0.1:{port}")
    header = wire.name_service(wire.pack_header(wire.Kind.REQUEST, 41, time.time()),
                               wire.service_tail("echo"))
    dealer.send_multipart([b"", header, msgpack.packb("hi")])
    assert dealer.poll(int(WAIT * 1000))
    reply_header, body = wire.parse_reply(dealer.recv_multipart())
    assert reply_header.kind is wire.Kind.ERROR and reply_header.msg_id == 41
    assert body["type"] == "RemoteProtocolError" and "'echo'" in body["message"]
    assert not called


# --- verification (loopback) -------------------------------------------------------------------


def test_a_hint_is_replaced_by_the_nodes_own_answer(make_node) -> None:
    """A record with a real node's name, id and control port but a higher seq and an endpoint
    it does not have: the node's answer wins."""
    real = make_node("real")
    real.publisher("ticks")
    observer = make_node("observer")
    observer.wait_for_endpoint(EndpointKind.STREAM, "ticks", WAIT)
    record = real.record
    txt = encode_txt(record)
    txt["seq"] = str(record.seq + 100)
    txt["e0"] += ";rep:bogus:9"
    zc = loopback_zeroconf()
    try:
        zc.register_service(forged_service_info(
            f"{record.name}@{record.node_id}.{SERVICE_TYPE}", record.node_id, txt,
            record.control.port if record.control else 0), cooperating_responders=True)
        wait_until(lambda: observer.counters.get("hints_corrected") > 0, WAIT,
                   "the forged hint to be verified")
        held = observer.directory.get(record.name)
        assert held is not None and held.find(EndpointKind.REPLY, "bogus") is None
        assert held.seq == record.seq
    finally:
        zc.close()


def test_a_record_whose_node_answers_as_another_is_refused(make_node) -> None:
    """Name and id must match the answer: a record pointing at another node's control port."""
    real = make_node("real")
    observer = make_node("observer")
    control = real.record.control
    assert control is not None
    name, node_id = unique("mirror"), secrets.token_hex(8)
    txt = {"v": "1", "id": node_id, "host": "forger", "pid": "1", "seq": "1",
           "fab": real.config.fabric, "e0": f"ctl:control:{control.port};rep:echo:9"}
    zc = loopback_zeroconf()
    try:
        zc.register_service(forged_service_info(f"{name}@{node_id}.{SERVICE_TYPE}", node_id,
                                                txt, control.port), cooperating_responders=True)
        reason = wait_until(lambda: {r.name: w for r, w in observer.refused_peers()}.get(name),
                            WAIT, "the mirror record to be refused")
        assert f"answers as node {real.name!r}" in reason
        assert observer.directory.get(name) is None
    finally:
        zc.close()


def test_a_node_is_usable_soon_after_it_starts(make_node) -> None:
    """Verification costs one control call: a peer calls a newcomer within a second."""
    peer = make_node("peer")
    newcomer = zf.Node(unique("newcomer"), fabric=peer.config.fabric)

    @newcomer.reply("hello-svc")
    def hello(body: Any) -> Any:
        return body

    with newcomer:
        newcomer.serve_in_background()
        start = time.monotonic()
        assert peer.request("hello-svc", 1, timeout=WAIT) == 1
        assert time.monotonic() - start < 1.0


def _late_answerer(router: zmq.Socket, name: str, txt: dict[str, str], skip: int,
                   calls: list[float], stop: threading.Event) -> None:
    """A control endpoint that takes every connection and answers the op ``record`` only from
    call ``skip + 1`` on (a node busy starting, as in a start rush)."""
    while not stop.is_set():
        if not router.poll(50):
            continue
        route_id, _, head, *body = router.recv_multipart()
        fields = msgpack.unpackb(head)
        request = msgpack.unpackb(body[0]) if body else fields[4]
        if request.get("op") != "record":
            continue
        calls.append(time.monotonic())
        if len(calls) > skip:
            router.send_multipart([route_id, b"", msgpack.packb(
                [2, 2, fields[2], time.time(), {"name": name, "txt": txt}])])


@pytest.mark.parametrize("skip", [1, 1000])
def test_a_node_that_takes_the_connection_but_answers_late_is_asked_again(make_node, raw,
                                                                          skip: int) -> None:
    """A busy node (its control endpoint takes the connection, the answer comes after the
    call's timeout) is not refused after two calls like an address where nothing listens: it is
    asked again with longer waits (VERIFY_BUSY_ATTEMPTS), and listed once it answers; one that
    never answers is never listed."""
    observer = make_node("observer", config=zf.NodeConfig(fabric=unique("quiet")))  # (counts calls)
    router = raw(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    name, node_id = unique("busy"), secrets.token_hex(8)
    txt = {"v": "1", "id": node_id, "host": "busy-host", "pid": "1", "seq": "1",
           "fab": observer.config.fabric, "e0": f"ctl:control:{port}"}
    calls: list[float] = []
    stop = threading.Event()
    server = threading.Thread(target=_late_answerer, args=(router, name, txt, skip, calls, stop))
    server.start()
    zc = loopback_zeroconf()
    try:
        zc.register_service(forged_service_info(f"{name}@{node_id}.{SERVICE_TYPE}", node_id,
                                                txt, port), cooperating_responders=True)
        if skip == 1:
            observer.wait_for_node(name, WAIT)
            assert len(calls) == 2, calls
        else:  # three calls (more than VERIFY_ATTEMPTS) and it is still not listed nor refused
            wait_until(lambda: len(calls) >= 3, 3 * WAIT, "the busy node to be asked again")
            assert observer.directory.get(name) is None
            assert name not in {r.name for r, _ in observer.refused_peers()}
            assert calls[2] - calls[1] > calls[1] - calls[0]  # waiting longer each time
    finally:
        zc.close()
        stop.set()
        server.join(WAIT)


def _introduce(sock: zmq.Socket, target: zf.Node, client_keys: Path | None,
               record: NodeRecord) -> None:
    """Call ``target``'s control op ``record`` on DEALER ``sock`` as a verifier does, introducing
    ``record`` (``me``), from 127.0.0.1, as a CURVE client with ``client_keys`` (None: plain)."""
    try:
        if client_keys is not None:
            mine = keys.load(client_keys)
            sock.curve_publickey, sock.curve_secretkey = mine.public.encode(), mine.secret.encode()
            sock.curve_serverkey = (target.record.curve_key or "").encode()
        control = target.record.control
        assert control is not None
        sock.connect(f"tcp://127.0.0.1:{control.port}")
        header = wire.name_service(wire.pack_header(wire.Kind.REQUEST, 7, time.time()),
                                   wire.service_tail("control"))
        me = {"name": record.name, "txt": encode_txt(record)}
        sock.send_multipart([b"", header, wire.pack_body({"op": "record", "me": me})])
        assert sock.poll(int(WAIT * 1000)), "the node did not answer the record call"
        sock.recv_multipart()
    finally:
        sock.close(0)


@pytest.mark.parametrize("secured", [True, False])
def test_a_verifiers_own_record_is_taken_on_its_word_only_over_curve(tmp_path: Path, raw,
                                                                     secured: bool) -> None:
    """A verification call carries the caller's record (``me``). Over CURVE with that record's
    key it is the caller's own word: the node lists it without calling back (one call per pair
    of nodes instead of two). Without keys nothing proves the control port it claims, so it is a
    hint, verified: here nothing answers there, and it is never listed."""
    server_dir, client_dir = tmp_path / "server", tmp_path / "client"
    server_key, client_key = keys.generate(server_dir), keys.generate(client_dir)
    keys.allow(server_dir, client_key, "client")
    keys.allow(client_dir, server_key, "server")
    with silent_port() as port, zf.Node(unique("verified"),
                                        keys=server_dir if secured else None) as target:
        record = NodeRecord(unique("caller"), secrets.token_hex(8), "caller-host", 1, "127.0.0.1",
                            (Endpoint(EndpointKind.CONTROL, "control", port),), 1,
                            client_key if secured else None, target.config.fabric)
        before = target.counters.get("verifications")
        judged = lambda: (target.counters.get("hints_refused")  # noqa: E731
                          + target.counters.get("hints_retried"))
        judged_before = judged()
        _introduce(raw(zmq.DEALER), target, client_dir if secured else None, record)
        if secured:
            listed = target.wait_for_node(record.name, WAIT)
            assert listed.node_id == record.node_id
            assert target.counters.get("peers_introduced") == 1
            assert target.counters.get("verifications") == before  # no call back
        else:
            wait_until(lambda: target.counters.get("verifications") > before, WAIT,
                       "the introduction to be verified")
            # The call fails at once (nothing listens): judged so, and it stays unlisted.
            wait_until(lambda: judged() > judged_before, WAIT, "the failed call to be judged")
            assert target.directory.get(record.name) is None
            assert target.counters.get("peers_introduced") == 0


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port where nothing listens (taken, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield port


# --- whole-message limit -------------------------------------------------------------------------


def test_a_message_of_many_frames_under_the_frame_limit_is_dropped(raw) -> None:
    """ZeroMQ's MAXMSGSIZE bounds each frame; the whole message is bounded too."""
    node = zf.Node(unique("small"), config=zf.NodeConfig(max_message_size=1024))

    @node.reply("echo")
    def echo(body: Any) -> Any:
        return body

    with node:
        node.serve_in_background()
        port = node.record.find(EndpointKind.REPLY, "echo").port
        dealer = raw(zmq.DEALER, connect=f"tcp://127.0.0.1:{port}")
        chunk = b"x" * 40_000  # each frame under 1 KiB + 64 KiB, together over it
        header = wire.pack_header(wire.Kind.REQUEST, 1, time.time())
        dealer.send_multipart([b"", header, chunk, chunk, chunk])
        wait_until(lambda: node.counters.get("refused_request") > 0, WAIT,
                   "the oversized message to be dropped")
        dealer.send_multipart([b"", wire.pack_header(wire.Kind.REQUEST, 2, time.time()),
                               msgpack.packb("small")])
        assert dealer.poll(int(WAIT * 1000))
        reply_header, body = wire.parse_reply(dealer.recv_multipart())
        assert reply_header.msg_id == 2 and body == "small"


def test_decided_claims_are_forgotten_by_node_and_bounded() -> None:
    """Forgetting a dead node's claims touches its own entries only (an index, not a scan at
    every death), and stays right when the oldest claims are evicted."""
    from zmqfabric.constants import MAX_VERIFY_CACHE
    from zmqfabric.discovery.hints import Decided

    def key(name: str, node: str, seq: int) -> tuple[str, str, int, str, int, str, str]:
        return (name, node, seq, "127.0.0.1", 7000, "", "")

    decided = Decided()
    decided.remember(key("a", "1" * 16, 1), 10.0)
    decided.remember(key("a", "1" * 16, 2), 11.0)
    decided.remember(key("b", "2" * 16, 1), 12.0)
    decided.forget("a", "1" * 16)
    assert decided.until(key("a", "1" * 16, 1)) is None
    assert decided.until(key("a", "1" * 16, 2)) is None
    assert decided.until(key("b", "2" * 16, 1)) == 12.0
    for seq in range(MAX_VERIFY_CACHE + 5):  # evicts b's claim, the oldest
        decided.remember(key("c", "3" * 16, seq), 20.0)
    assert decided.until(key("b", "2" * 16, 1)) is None
    decided.forget("b", "2" * 16)  # already evicted: nothing left to drop, no error
    decided.forget("c", "3" * 16)
    assert decided.until(key("c", "3" * 16, MAX_VERIFY_CACHE)) is None
    decided.remember(key("c", "3" * 16, 1), 30.0)
    assert decided.until(key("c", "3" * 16, 1)) == 30.0
