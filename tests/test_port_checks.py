"""Port checks are answered, every one, when more are asked at once than sockets may be open
(discovery/probes.py ``Prober.check_port``).

A check asks the kernel whether anything listens at a member's control port: "refused" is a
death for certain. In a death storm a survivor asks for dozens at once (stale deaths, its
watched successors). Before, a check beyond MAX_PROBE_SOCKETS was answered "unknown" without
being made, and a stale death checked that way was never checked again at that incarnation:
the killed node stayed in that survivor's table until anti-entropy, 30-60 s later (seen twice
at 100-150 nodes). Real TCP sockets on loopback; the node is a stand-in with counters only.
"""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace
from typing import Callable

import zmq

from zmqfabric.constants import MAX_PROBE_SOCKETS, MAX_QUEUED_CHECKS
from zmqfabric.discovery.probes import Prober
from zmqfabric.stats import Counters


def closed_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that nothing listens on (bound, then released)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def answer_into(answers: dict[int, bool | None], i: int) -> Callable[[bool | None], None]:
    def on_result(closed: bool | None) -> None:
        answers[i] = closed
    return on_result


def drive(prober: Prober, poller: zmq.Poller, answers: dict[int, bool | None],
          expected: int) -> None:
    """Run the housekeeping loop's part: poll, hand readable fds over, expire; at most 5 s."""
    deadline = time.monotonic() + 5.0
    while len(answers) < expected and time.monotonic() < deadline:
        for fd, _ in poller.poll(50):
            prober.on_readable(fd)
        prober.expire(time.monotonic())


def test_every_check_is_made_beyond_the_open_sockets() -> None:
    count = 3 * MAX_PROBE_SOCKETS
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(count)
    ports = closed_ports(count - 4) + [listener.getsockname()[1]] * 4
    node = SimpleNamespace(counters=Counters())
    poller = zmq.Poller()
    prober = Prober(node, poller, on_lost=lambda url: None,  # type: ignore[arg-type]
                    on_refused=lambda url: None)
    answers: dict[int, bool | None] = {}
    try:
        for i, port in enumerate(ports):
            prober.check_port(f"tcp://127.0.0.1:{port}", answer_into(answers, i))
        drive(prober, poller, answers, count)
    finally:
        prober.close()
        listener.close()
    assert len(answers) == count
    assert [answers[i] for i in range(count - 4)] == [True] * (count - 4), "refused: closed"
    assert [answers[i] for i in range(count - 4, count)] == [False] * 4, "accepted: listening"
    assert node.counters.get("port_checks_dropped") == 0


def test_checks_beyond_the_queue_are_answered_unknown_and_counted() -> None:
    """The queue is bounded: a flood of checks costs no more than MAX_QUEUED_CHECKS waiting, and
    the rest get "unknown" at once; queued ones that wait past PORT_CHECK_S get "unknown" too."""
    # Ports whose connects hang: a listener that never accepts, its backlog full.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    node = SimpleNamespace(counters=Counters())
    poller = zmq.Poller()
    prober = Prober(node, poller, on_lost=lambda url: None,  # type: ignore[arg-type]
                    on_refused=lambda url: None)
    count = MAX_PROBE_SOCKETS + MAX_QUEUED_CHECKS + 5
    answers: dict[int, bool | None] = {}
    try:
        for i in range(count):
            prober.check_port(url, answer_into(answers, i))
        assert node.counters.get("port_checks_dropped") == 5
        assert [answers[i] for i in range(count - 5, count)] == [None] * 5
        drive(prober, poller, answers, count)
        assert prober.next_deadline() is None, "nothing left waiting"
    finally:
        prober.close()
        listener.close()
    assert len(answers) == count, "every check is answered within PORT_CHECK_S of its asking"
