"""The SWIM member table without IO (zmqfabric.core.swim): probe schedule, suspicion, refutation,
gossip precedence, formers. Pure: the clock is passed in; runs in milliseconds."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmqfabric import constants as C
from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord
from zmqfabric.core.rings import phase
from zmqfabric.core.swim import NOTHING, Members, State, Timing
from zmqfabric.core.updates import (
    MAX_INCARNATION,
    Broadcasts,
    Kind,
    Update,
    refutes,
    transmit_limit,
)
from zmqfabric.errors import LocalProtocolError, RemoteProtocolError

T = Timing()


def node_id(i: int) -> str:
    return f"{i:016x}"


def record(i: int) -> NodeRecord:
    ctl = Endpoint(EndpointKind.CONTROL, "control", 7000 + i)
    return NodeRecord(f"n{i}", node_id(i), "host", 100 + i, "127.0.0.1", (ctl,))


def table(me: int, others: range | list[int], now: float = -1000.0,
          inc: int | None = 0) -> Members:
    """Node ``me``'s table holding ``others`` since ``now`` (long ago: not young), at
    incarnation ``inc`` as if they had told us (None: known from their records only)."""
    members = Members(node_id(me), T, random.Random(me))
    for i in others:
        if i != me:
            rec = record(i)
            members.join(rec, f"tcp://127.0.0.1:{7000 + i}", now, inc)
    return members


# --- wire -----------------------------------------------------------------------------------------


@given(kind=st.sampled_from(Kind), i=st.integers(0, 2**40), inc=st.integers(0, MAX_INCARNATION),
       url=st.sampled_from(["", "tcp://10.0.0.1:5555"]), origin=st.sampled_from(["", "a" * 16]))
def test_updates_round_trip(kind: Kind, i: int, inc: int, url: str, origin: str) -> None:
    update = Update(kind, node_id(i), inc, "node-1", url, None, origin)
    assert Update.decode(update.encode()) == update


@pytest.mark.parametrize("raw", [
    None, [], [0, "x" * 16, 0, "n", "", None, ""], [9, node_id(1), 0, "n", "", None, ""],
    [0, node_id(1), -1, "n", "", None, ""], [0, node_id(1), True, "n", "", None, ""],
    [0, node_id(1), 2**63, "n", "", None, ""], [0, node_id(1), 0, "Bad Name", "", None, ""],
    [0, node_id(1), 0, "n", "http://x", None, ""], [0, node_id(1), 0, "n", "", "short", ""],
    [0, node_id(1), 0, "n", "", None, "zz"], [0, node_id(1), 0, "n", "", None, "", "extra"],
])
def test_malformed_updates_are_refused(raw: object) -> None:
    with pytest.raises(RemoteProtocolError):
        Update.decode(raw)


def test_timing_is_validated() -> None:
    with pytest.raises(LocalProtocolError):
        Timing(probe_interval_s=0.5, probe_timeout_s=0.2)  # three timeouts exceed the period
    with pytest.raises(LocalProtocolError):
        Timing(suspicion_s=0)
    with pytest.raises(LocalProtocolError):
        Timing(suspicion_max_factor=0.5)


# --- gossip queue ---------------------------------------------------------------------------------


def test_transmit_limit_grows_with_log_n() -> None:
    assert transmit_limit(0, 4) == 4
    assert transmit_limit(9, 4) == 4
    assert transmit_limit(99, 4) == 8
    assert transmit_limit(300, 4) == 12


def test_broadcasts_send_the_least_sent_first_and_drop_after_the_limit() -> None:
    queue = Broadcasts()
    a = Update(Kind.DEAD, node_id(1), 0, "a")
    b = Update(Kind.DEAD, node_id(2), 0, "b")
    queue.add(a)
    assert queue.take(1, limit=3) == [a]
    queue.add(b)
    assert queue.take(1, limit=3) == [b]  # b was sent 0 times, a once
    assert queue.take(2, limit=3) == [a, b]
    assert queue.take(2, limit=3) == [a, b]  # a: third time, gone; b: third time, gone
    assert queue.take(2, limit=3) == [] and len(queue) == 0


def test_a_newer_update_about_a_node_replaces_the_queued_one() -> None:
    queue = Broadcasts()
    queue.add(Update(Kind.SUSPECT, node_id(1), 3, "a"))
    alive = Update(Kind.ALIVE, node_id(1), 4, "a")
    queue.add(alive)
    assert queue.take(5, limit=2) == [alive] and len(queue) == 1


def test_each_update_is_pushed_to_each_target_once() -> None:
    """Gossip pushed to the ring successors (kept TCP connections): a second copy to the same
    target carries nothing, and such copies were most of a node's messages in a death storm.
    A new target gets everything still queued; a queue longer than a message continues in the
    next round; piggybacking (take) is unaffected."""
    queue = Broadcasts()
    a = Update(Kind.DEAD, node_id(1), 0, "a")
    b = Update(Kind.DEAD, node_id(2), 0, "b")
    s1, s2, s3 = node_id(11), node_id(12), node_id(13)
    queue.add(a)
    assert queue.unspread
    assert queue.spread([s1, s2], 32, limit=9) == {s1: [a.encode()], s2: [a.encode()]}
    assert not queue.unspread
    assert queue.spread([s1, s2], 32, limit=9) == {s1: [], s2: []}  # nothing new for them
    queue.add(b)
    assert queue.spread([s1, s2], 32, limit=9) == {s1: [b.encode()], s2: [b.encode()]}
    queue.retarget()  # s2 died; s3 follows us now
    assert queue.unspread
    assert queue.spread([s1, s3], 32, limit=9) == {s1: [], s3: [a.encode(), b.encode()]}
    assert queue.take(5, limit=9) == [a, b]  # still piggybacked until the limit
    out = queue.spread([node_id(14)], 1, limit=9)  # one a message: the rest waits a round
    assert len(out[node_id(14)]) == 1 and queue.unspread
    # A push counts as one transmission, however many targets it went to.
    gone = Broadcasts()
    gone.add(a)
    gone.spread([s1, s2, s3], 32, limit=1)
    assert len(gone) == 0


# --- the probe schedule ---------------------------------------------------------------------------


@given(n=st.integers(2, 60), round_no=st.integers(0, 10**9))
def test_each_round_every_member_is_probed_by_exactly_one_node(n: int, round_no: int) -> None:
    """With the same view everywhere, one period's probes are a permutation of the fabric."""
    ids = list(range(n))
    probed = [table(i, ids).target(round_no) for i in ids]
    assert sorted(m.node_id for m in probed if m is not None) == sorted(node_id(i) for i in ids)


def test_a_node_takes_turns_over_a_few_members_only() -> None:
    members = table(0, range(300))
    turns = {members.target(r).node_id for r in range(100)}  # type: ignore[union-attr]
    assert len(turns) == 3 and turns == {m.node_id for m in members.targets()}


def test_no_target_alone_and_refused_members_are_skipped() -> None:
    assert table(0, []).target(7) is None
    members = table(0, [1, 2])
    members.refused(node_id(1))
    assert {members.target(r).node_id for r in range(6)} == {node_id(2)}  # type: ignore[union-attr]


def test_members_are_probed_at_phases_spread_over_the_period() -> None:
    phases = sorted(phase(node_id(i)) for i in range(1000))
    assert 0 <= phases[0] and phases[-1] < 1 and phase(node_id(7)) == phase(node_id(7))
    assert all(len([p for p in phases if k / 10 <= p < (k + 1) / 10]) > 60 for k in range(10))


def test_a_member_being_probed_is_skipped_for_the_next_on_that_ring() -> None:
    members = table(0, range(1, 10))
    first = members.target(4)
    assert first is not None
    second = members.target(4, {first.node_id})
    assert second is not None and second.node_id != first.node_id
    assert members.target(4, {node_id(i) for i in range(1, 10)}) is None


def test_a_node_cut_off_suspects_every_member_one_per_period() -> None:
    """Our own suspects are skipped: a node that reaches nobody probes (and suspects) a new
    member each period, not only its successors (which the rings would keep for it until they
    die, a suspicion time each)."""
    members = table(0, range(1, 8))
    for r in range(7):
        target = members.target(r)
        assert target is not None and target.state is State.ALIVE
        members.failed(target.node_id, float(r))
    states = {members.get(node_id(i)).state for i in range(1, 8)}  # type: ignore[union-attr]
    assert states == {State.SUSPECT}
    assert members.target(7) is None


# --- suspicion, death, refutation -----------------------------------------------------------------


def test_a_silent_member_is_suspect_then_dead_then_a_former() -> None:
    members = table(0, range(5))
    out = members.failed(node_id(1), now=10.0)
    assert [u.kind for u in out.gossip] == [Kind.SUSPECT] and out.gossip[0].origin == node_id(0)
    member = members.get(node_id(1))
    assert member is not None and member.state is State.SUSPECT
    deadline = members.deadline(member)
    assert members.next_deadline() == deadline
    assert not members.expire(deadline - 0.01).removed
    out = members.expire(deadline)
    assert [(m.node_id, why) for m, why in out.removed] == [(node_id(1), "dead")]
    assert [u.kind for u in out.gossip] == [Kind.DEAD]
    assert members.get(node_id(1)) is None and members.former(node_id(1)) is not None
    assert len(members) == 3 and members.formers() == 1


def test_an_answer_with_a_higher_incarnation_refutes_a_suspicion() -> None:
    members = table(0, range(5))
    members.failed(node_id(1), now=0.0)
    assert not members.acked(node_id(1), 0, now=0.1).gossip  # same incarnation: still suspect
    out = members.acked(node_id(1), 1, now=0.2)
    assert [(u.kind, u.inc) for u in out.gossip] == [(Kind.ALIVE, 1)]
    assert members.get(node_id(1)).state is State.ALIVE  # type: ignore[union-attr]
    assert not members.expire(100.0).removed


def test_suspicion_time_scales_with_log_n_and_shrinks_with_confirmations() -> None:
    small, big = table(0, range(5)), table(0, range(300))
    assert small.suspicion_timeout(0) == pytest.approx(T.suspicion_s * T.suspicion_max_factor)
    low = T.suspicion_s * math.log10(300)
    assert big.suspicion_timeout(0) == pytest.approx(low * T.suspicion_max_factor)
    times = [big.suspicion_timeout(c) for c in range(5)]
    assert times == sorted(times, reverse=True)
    assert times[T.confirmations] == pytest.approx(low) and times[4] == pytest.approx(low)
    big.floor = 10.0  # answers have been slow: a suspect gets at least this long
    assert big.suspicion_timeout(4) == pytest.approx(10.0)


def test_independent_confirmations_bring_the_death_forward() -> None:
    members = table(0, range(300))
    members.failed(node_id(1), now=0.0)
    member = members.get(node_id(1))
    assert member is not None
    alone = members.deadline(member)
    for origin in (2, 3, 3, 4):  # 3 repeats: not independent
        members.apply(Update(Kind.SUSPECT, node_id(1), 0, "n1", origin=node_id(origin)), 0.1)
    assert member.suspecters == [node_id(0), node_id(2), node_id(3), node_id(4)]
    assert members.deadline(member) < alone
    assert members.deadline(member) == pytest.approx(T.suspicion_s * math.log10(300))


def test_gossip_precedence() -> None:
    members = table(0, range(5))
    one = node_id(1)
    # A suspicion at an older incarnation than we know is ignored.
    members.acked(one, 3, now=0.0)
    assert not members.apply(Update(Kind.SUSPECT, one, 2, "n1", origin=node_id(2)), 0.0).gossip
    # At ours it holds, is passed on, and asks us to probe the suspect ourselves.
    out = members.apply(Update(Kind.SUSPECT, one, 3, "n1", origin=node_id(2)), 0.0)
    assert out.gossip and out.confirm and members.get(one).state is State.SUSPECT  # type: ignore
    # Alive at the same incarnation does not clear it; a higher one does.
    assert not members.apply(Update(Kind.ALIVE, one, 3, "n1"), 0.1).gossip
    assert members.apply(Update(Kind.ALIVE, one, 4, "n1"), 0.1).gossip
    assert members.get(one).state is State.ALIVE  # type: ignore[union-attr]
    # Dead at an older incarnation is ignored; at ours the member goes.
    assert not members.apply(Update(Kind.DEAD, one, 3, "n1"), 0.2).removed
    out = members.apply(Update(Kind.DEAD, one, 4, "n1"), 0.2)
    assert [why for _, why in out.removed] == ["dead"] and members.former(one) is not None
    # A leave removes a member for good (no former).
    out = members.apply(Update(Kind.LEFT, node_id(2), 0, "n2"), 0.3)
    assert [why for _, why in out.removed] == ["left"] and members.former(node_id(2)) is None


def test_gossip_never_admits_a_node_it_asks_for_verification() -> None:
    members = table(0, range(3))
    stranger = Update(Kind.ALIVE, node_id(9), 0, "n9", "tcp://127.0.0.1:7009")
    out = members.apply(stranger, 0.0)
    assert out.verify == [stranger] and members.get(node_id(9)) is None
    # Without a URL there is nothing to verify.
    assert not members.apply(Update(Kind.ALIVE, node_id(8), 0, "n8"), 0.0).verify
    # Suspicions and deaths of strangers are ignored.
    assert not members.apply(Update(Kind.DEAD, node_id(9), 5, "n9"), 0.0).removed
    assert len(members) == 2


def test_a_former_that_refuted_its_death_is_verified_and_a_leave_forgets_it() -> None:
    members = table(0, range(3))
    members.apply(Update(Kind.DEAD, node_id(1), 0, "n1"), 0.0)
    assert not members.apply(Update(Kind.ALIVE, node_id(1), 0, "n1", "tcp://127.0.0.1:7001"),
                             0.1).verify  # what we already buried
    back = Update(Kind.ALIVE, node_id(1), 1, "n1", "tcp://127.0.0.1:7001")
    assert members.apply(back, 0.2).verify == [back]
    members.join(record(1), back.url, 0.3, inc=1)
    assert members.get(node_id(1)).state is State.ALIVE  # type: ignore[union-attr]
    assert members.former(node_id(1)) is None
    members.apply(Update(Kind.DEAD, node_id(1), 1, "n1"), 0.4)
    members.apply(Update(Kind.LEFT, node_id(1), 1, "n1"), 0.5)
    assert members.former(node_id(1)) is None


def test_formers_are_forgotten_after_former_keep_s() -> None:
    members = table(0, range(4))
    members.failed(node_id(1), 0.0)
    members.expire(100.0)
    members.dead(node_id(2), 200.0)
    assert members.formers() == 2
    # Each in its turn (expire looks at the table only once the oldest is due).
    assert [f.node_id for f in members.expire(100.0 + T.former_keep_s + 1).forgotten] == [
        node_id(1)]
    assert members.formers() == 1
    assert members.expire(150.0 + T.former_keep_s).forgotten == ()
    members.expire(200.0 + T.former_keep_s + 1)
    assert members.formers() == 0


def test_nothing_is_shared_and_read_only() -> None:
    """Calls that change nothing return NOTHING (no six lists built per update); an append to
    it would leak to every caller, so it fails."""
    members = table(0, range(3))
    assert members.apply(Update(Kind.DEAD, node_id(9), 0, "n9"), 0.0) is NOTHING
    assert members.acked(node_id(1), 0, 0.0) is NOTHING
    with pytest.raises(AttributeError):
        NOTHING.gossip.append(Update(Kind.DEAD, node_id(9), 0, "n9"))  # type: ignore[attr-defined]


def test_updates_about_this_node_are_left_to_the_caller() -> None:
    members = table(0, range(3))
    out = members.apply(Update(Kind.DEAD, node_id(0), 5, "n0"), 0.0)
    assert not (out.gossip or out.removed or out.verify or out.confirm)
    assert refutes(Update(Kind.SUSPECT, node_id(0), 2, "n0"), inc=2)
    assert refutes(Update(Kind.DEAD, node_id(0), 3, "n0"), inc=2)
    assert not refutes(Update(Kind.DEAD, node_id(0), 1, "n0"), inc=2)
    assert refutes(Update(Kind.ALIVE, node_id(0), 3, "n0"), inc=2)
    assert not refutes(Update(Kind.ALIVE, node_id(0), 2, "n0"), inc=2)


def test_a_suspicion_about_a_member_never_heard_from_only_asks_for_a_probe() -> None:
    members = table(0, range(3), inc=None)  # joined from their records: incarnations unknown
    stale = Update(Kind.SUSPECT, node_id(1), 4, "n1", origin=node_id(2))
    out = members.apply(stale, 0.0)
    member = members.get(node_id(1))
    assert out.confirm == [(member, 4)] and not out.gossip
    assert member is not None and member.state is State.ALIVE
    # Our own probe failed: now it is our suspicion.
    assert members.failed(node_id(1), 0.5).gossip and member.state is State.SUSPECT
    # Once it answered us, suspicions count as usual; deaths count anyway.
    members.acked(node_id(2), 0, 0.6)
    assert members.apply(Update(Kind.SUSPECT, node_id(2), 0, "n2"), 0.7).gossip
    out = members.apply(Update(Kind.DEAD, node_id(1), 4, "n1"), 0.8)
    assert [why for _, why in out.removed] == ["dead"]


def test_a_former_back_at_its_buried_incarnation_ignores_old_accusations() -> None:
    members = table(0, range(3))
    members.apply(Update(Kind.DEAD, node_id(1), 2, "n1"), 0.0)
    members.join(record(1), "tcp://127.0.0.1:7001", 1.0)  # mDNS brought it back
    member = members.get(node_id(1))
    assert member is not None and member.buried == 2 and member.inc == 2
    # The "dead" still travelling about it (and suspicions at that incarnation) change nothing.
    assert not members.apply(Update(Kind.DEAD, node_id(1), 2, "n1"), 1.1).removed
    assert not members.apply(Update(Kind.SUSPECT, node_id(1), 2, "n1"), 1.1).gossip
    # Accusations at a later incarnation (after it refuted) count again.
    members.acked(node_id(1), 3, 1.2)
    assert members.apply(Update(Kind.DEAD, node_id(1), 3, "n1"), 1.3).removed


def test_a_stale_death_asks_once_per_incarnation_whether_the_port_still_listens() -> None:
    """A node that missed a member's refutation finds it dead and gossips that at the older
    incarnation: the nodes that knew the later one must not just drop it (only the member's ring
    predecessors probe it), nor check its port again for every copy of the same news."""
    members = table(0, range(4))
    one = node_id(1)
    members.acked(one, 3, now=0.0)  # it refuted a suspicion: we know incarnation 3
    member = members.get(one)
    out = members.apply(Update(Kind.DEAD, one, 2, "n1"), 0.1)
    assert out.check == [member] and not out.removed and not out.gossip
    assert not members.apply(Update(Kind.DEAD, one, 2, "n1"), 0.2).check  # once per incarnation
    assert not members.apply(Update(Kind.SUSPECT, one, 2, "n1"), 0.2).check  # deaths only
    members.acked(one, 4, now=0.3)
    assert members.apply(Update(Kind.DEAD, one, 3, "n1"), 0.4).check == [member]
    # A death we buried (it came back at that incarnation) asks too.
    members.apply(Update(Kind.DEAD, node_id(2), 0, "n2"), 0.5)
    members.join(record(2), "tcp://127.0.0.1:7002", 0.6)
    assert members.apply(Update(Kind.DEAD, node_id(2), 0, "n2"), 0.7).check == [
        members.get(node_id(2))]


def test_anti_entropy_learns_what_gossip_missed() -> None:
    ours = table(0, [1, 2])
    theirs = table(3, [0, 1, 2, 4])
    theirs.acked(node_id(1), 5, 0.0)
    listed = {Update.decode(raw).node_id: Update.decode(raw) for raw in theirs.summary()}
    assert set(listed) == {node_id(0), node_id(1), node_id(2), node_id(4)}
    # A member at a later incarnation: taken as its alive.
    assert ours.merge(listed[node_id(1)], 1.0).gossip
    assert ours.get(node_id(1)).inc == 5  # type: ignore[union-attr]
    # A node we never heard of: a hint to verify, not a member.
    assert ours.merge(listed[node_id(4)], 1.0).verify == [listed[node_id(4)]]
    assert ours.get(node_id(4)) is None
    # Ourselves, and members at our incarnation: nothing.
    assert ours.merge(listed[node_id(0)], 1.0) is NOTHING
    assert not ours.merge(listed[node_id(2)], 1.0).gossip
    # A member we buried that they still list: verify it (the caller reports it dead again).
    ours.apply(Update(Kind.DEAD, node_id(2), 0, "n2"), 2.0)
    assert ours.merge(listed[node_id(2)], 3.0).verify == [listed[node_id(2)]]


def test_only_a_suspicion_of_our_own_runs_out_here() -> None:
    members = table(0, range(300))
    heard = Update(Kind.SUSPECT, node_id(1), 0, "n1", origin=node_id(2))
    members.apply(heard, 0.0)
    member = members.get(node_id(1))
    assert member is not None and member.state is State.SUSPECT
    assert members.next_deadline() is None and not members.expire(1000.0).removed
    # Our own probe failed too: now our timer runs (with the other's suspicion as confirmation).
    members.failed(node_id(1), 10.0)
    assert members.next_deadline() is not None
    assert [why for _, why in members.expire(1000.0).removed] == ["dead"]


def test_a_slow_member_that_refuted_is_not_slow_next_time() -> None:
    members = table(0, range(5))
    members.failed(node_id(1), 0.0, listening=True)
    slow = members.get(node_id(1))
    assert slow is not None and members.deadline(slow) >= C.SLOW_PEER_S
    members.apply(Update(Kind.ALIVE, node_id(1), 1, "n1"), 1.0)  # it refuted (gossip)
    members.failed(node_id(1), 2.0)
    assert members.deadline(slow) < 2.0 + C.SLOW_PEER_S


def test_alive_ids_are_the_members_not_suspect() -> None:
    members = table(0, range(6))
    assert members.alive_ids() == {node_id(i) for i in range(1, 6)}
    members.apply(Update(Kind.SUSPECT, node_id(1), 0, "n1", origin=node_id(2)), 0.0)
    members.apply(Update(Kind.DEAD, node_id(2), 0, "n2"), 0.0)
    members.leave(node_id(3))
    assert members.alive_ids() == {node_id(4), node_id(5)}
    members.acked(node_id(1), 1, 0.1)  # refuted
    members.join(record(2), "tcp://127.0.0.1:7002", 0.2)  # back
    assert members.alive_ids() == {node_id(i) for i in (1, 2, 4, 5)}


def test_anti_entropy_lists_recent_deaths_after_the_members() -> None:
    """A node that missed a death's gossip learns it at the next swap: the list carries the
    formers found dead, most recent first, after every member."""
    ours = table(0, range(5))
    ours.failed(node_id(1), 0.0)
    ours.expire(100.0)  # 1 is dead: a former
    ours.apply(Update(Kind.DEAD, node_id(2), 0, "n2"), 200.0)
    listed = [Update.decode(item) for item in ours.summary()]
    assert [(u.kind, u.node_id) for u in listed] == [
        (Kind.ALIVE, node_id(3)), (Kind.ALIVE, node_id(4)),
        (Kind.DEAD, node_id(2)), (Kind.DEAD, node_id(1))]
    theirs = table(9, range(5))  # still holds 1 and 2
    for update in listed:
        if update.kind is Kind.DEAD:
            theirs.apply(update, 300.0)
    assert theirs.get(node_id(1)) is None and theirs.get(node_id(2)) is None
