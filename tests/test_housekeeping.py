"""The housekeeping thread (zmqfabric.discovery.housekeeping) runs liveness for the node's whole
life: nothing its timers compute may end it.

Found at 250 nodes (perf/scale.py): a node's first news came before its first push (a refutation
queued by the control thread), its "last push" was -inf, so the next deadline was -inf and
``math.ceil`` raised OverflowError outside the loop's guard. The thread ended, and with it the
node's probing, gossip and anti-entropy: its view froze at 20 of 250 members. White-box: the
deadline is the liveness object's own.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import pytest

import zmqfabric as zf
from zmqfabric.core.updates import Kind, Update

from .helpers import wait_until


def _housekeeping(node: zf.Node) -> Any:
    return node._parts._housekeeping  # noqa: SLF001 - white-box: the thread and its liveness


@pytest.mark.parametrize("deadline", [-math.inf, math.inf, math.nan])
def test_a_deadline_that_is_not_finite_does_not_end_the_thread(
        make_node: Callable[..., zf.Node], deadline: float) -> None:
    housekeeping = _housekeeping(make_node("hk"))
    liveness, asked, ran = housekeeping._liveness, [], []

    def next_deadline() -> float:
        asked.append(deadline)
        return deadline

    housekeeping._inbox.post(setattr, liveness, "next_deadline", next_deadline)
    wait_until(lambda: asked, 3, "the loop to compute its wait from that deadline")
    housekeeping._inbox.post(ran.append, True)  # wakes the loop: it waits, runs this, comes back
    wait_until(lambda: ran and len(asked) >= 2, 3,
               "the housekeeping thread to run what was posted after, and wait again")
    housekeeping._inbox.post(delattr, liveness, "next_deadline")
    assert housekeeping._thread.is_alive()


def test_news_before_the_first_push_is_due_at_a_finite_time(
        make_node: Callable[..., zf.Node]) -> None:
    liveness = _housekeeping(make_node("hk"))._liveness
    liveness.local.add([Update(Kind.DEAD, "00000000000000cc", 1, "someone")])
    due = liveness.local.gossip_due(liveness._last_gossip)
    assert math.isfinite(due) and due <= time.monotonic()
