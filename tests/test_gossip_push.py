"""Gossip pushed to the ring successors is one-way (zmqfabric.discovery.liveness ``_spread``,
discovery/swim.py ``Responder.answer(..., one_way=True)``, PROTOCOL.md 6.5 "Gossip").

A push is a ``probe`` with id 0: the receiver takes its gossip (and refutes an accusation in it)
but answers nothing and builds no reply, so none of its own queued gossip is spent on a reply
that is never sent. Each update is pushed to each target once (tests/test_core_swim.py). Real
sockets for the wire part; the responder part is a stand-in node with a config only.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Callable

import zmq

import zmqfabric as zf
from zmqfabric.config import NodeConfig
from zmqfabric.core import wire
from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord
from zmqfabric.core.timers import Timing
from zmqfabric.core.updates import Kind, Update
from zmqfabric.discovery.swim import Local, Responder
from zmqfabric.stats import Counters

ME = "00000000000000aa"
OTHER = "00000000000000bb"


def responder(config: NodeConfig | None = None) -> tuple[Responder, Local, list[Any]]:
    record = NodeRecord("me", ME, "host", 1, "127.0.0.1",
                        (Endpoint(EndpointKind.CONTROL, "control", 7001),), 1)
    node: Any = SimpleNamespace(config=config or NodeConfig(), node_id=ME, counters=Counters(),
                                record=record)
    local = Local(node)
    posted: list[Any] = []
    listener: Any = SimpleNamespace(heard="heard", relayed="relayed", synced="synced",
                                    probe_for="probe_for")

    def post(*call: Any) -> bool:
        posted.append(call)
        return True

    return Responder(node, local, listener, post), local, posted


def test_a_one_way_probe_builds_no_reply_and_spends_no_gossip() -> None:
    answering, local, posted = responder()
    news = Update(Kind.DEAD, OTHER, 3, "other")
    local.add([news])  # sent once before it is dropped (a node alone: the least limit)
    pushed = Update(Kind.SUSPECT, "00000000000000cc", 1, "third", origin=OTHER)
    body = {"op": "probe", "to": [ME, 0, False], "from": None, "g": [pushed.encode()]}
    assert answering.answer(body, "127.0.0.1", None, one_way=True) is None
    assert posted and posted[0][:2] == ("heard", [pushed])  # its gossip is taken all the same
    # Our news is still queued: the one-way probe did not spend it.
    reply = answering.answer(body, "127.0.0.1", None)
    assert reply is not None and reply["g"] == [news.encode()]
    assert local.take(8) == []  # and that answer did


def test_a_one_way_accusation_is_refuted_all_the_same() -> None:
    answering, local, _ = responder()
    body = {"op": "probe", "to": [ME, 0, True], "from": None, "g": []}
    assert answering.answer(body, "127.0.0.1", None, one_way=True) is None
    assert local.inc == 1 and local.gossip_due(0.0) < float("inf")  # it gossips its refutation


def request(msg_id: int, body: dict[str, Any]) -> list[bytes]:
    return [b"", wire.pack_header(wire.Kind.REQUEST, msg_id, time.time()), wire.pack_body(body)]


def test_a_node_answers_a_probe_and_not_a_push(make_node: Callable[..., zf.Node],
                                               raw: Any) -> None:
    node = make_node("push")
    control = node.record.control
    assert control is not None
    dealer = raw(zmq.DEALER, connect=f"tcp://127.0.0.1:{control.port}")
    probe = {"op": "probe", "to": [node.node_id, 0, False], "from": None, "g": []}
    dealer.send_multipart(request(0, probe))  # a push: one-way
    dealer.send_multipart(request(7, probe))  # a probe
    assert dealer.poll(5000), "the probe was not answered"
    header, answer = wire.parse_reply(dealer.recv_multipart())
    # Answers come in order on one connection: a reply to the push would have come first.
    assert header.msg_id == 7 and answer["id"] == node.node_id
    assert not dealer.poll(300)


def test_suspicions_and_refutations_are_pushed_sooner_than_other_news() -> None:
    """Local.gossip_due: news waits GOSSIP_BATCH_S after the last push (deaths, leaves, joins:
    fewer, fuller pushes in a storm), a suspicion or a refutation (alive above incarnation 0)
    only GOSSIP_INTERVAL_S; nothing is due without news, and a push clears both."""
    timing = Timing(gossip_batch_s=0.3)  # off by default (0.1: constants.GOSSIP_BATCH_S)
    _, local, _ = responder(NodeConfig(liveness=timing))
    local.sized(10)  # each update is pushed a few times before it leaves the queue
    last = 100.0
    assert local.gossip_due(last) == float("inf")
    for kind, inc, due in [(Kind.DEAD, 0, timing.gossip_batch_s),
                           (Kind.LEFT, 3, timing.gossip_batch_s),
                           (Kind.ALIVE, 0, timing.gossip_batch_s),  # a join
                           (Kind.ALIVE, 2, timing.gossip_interval_s),  # a refutation
                           (Kind.SUSPECT, 0, timing.gossip_interval_s)]:
        local.add([Update(kind, OTHER, inc, "other", "tcp://127.0.0.1:7001", None,
                          ME if kind is Kind.SUSPECT else "")])
        assert local.gossip_due(last) == last + due, (kind, inc)
        assert local.spread([ME])[ME]  # pushed: nothing is due until the next news
        assert local.gossip_due(last) == float("inf")
    # A refutation queued behind others is still urgent after a retarget (a new successor).
    local.add([Update(Kind.ALIVE, OTHER, 5, "other", "tcp://127.0.0.1:7001", None, "")])
    local.spread([ME])
    local.retarget()
    assert local.gossip_due(last) == last + timing.gossip_interval_s
