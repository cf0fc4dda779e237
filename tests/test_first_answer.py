"""A node that has timed no answer yet probes the first member it admits at once
(zmqfabric.discovery.liveness ``Liveness.join``), not at that member's turn.

Until it has timed an answer, each of its probes waits PROBE_TIMEOUT_INITIAL_S (1 s, as TCP's
first timeout) and ends after three: a cable pulled right after a young fabric converged was
seen in 4.1 s instead of about 2 when a node's first probe went to the cut host
(tests/lan/test_partition.py). Here the probe period is ten minutes, so no turn comes within
the test, and the first anti-entropy swap (also an answer to time) comes 2-4 s after the start:
within a second of the first join, only the probe at first contact times an answer. White-box:
the answer time is the prober's own state.
"""

from __future__ import annotations

from typing import Any, Callable

import zmqfabric as zf
from zmqfabric.core.timers import Timing

from .helpers import unique, wait_until

SLOW = Timing(probe_interval_s=600.0)


def _round_trip(node: zf.Node) -> Any:
    return node._parts._housekeeping._liveness._prober.rtt  # type: ignore[union-attr]  # noqa: SLF001


def test_a_young_node_times_an_answer_at_first_contact(make_node: Callable[..., zf.Node]) -> None:
    config = zf.NodeConfig(fabric=unique("first-answer"), liveness=SLOW)  # the two alone
    first = make_node("young", config=config)
    assert _round_trip(first).srtt is None  # alone: nothing timed
    second = make_node("other", config=config)
    first.wait_for_node(second.name, 10.0)
    # Within a second: the probe at first contact is answered in milliseconds, and what else
    # times an answer comes later (the first anti-entropy swap, 2-4 s after the start).
    wait_until(lambda: _round_trip(first).srtt is not None, timeout=1.0,
               what="the young node timed its first answer")
    assert _round_trip(first).srtt < 1.0  # an answer on loopback, not the initial timeout
