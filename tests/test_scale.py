"""Membership at fleet size, with real processes on loopback (one node each, tests/fleet.py).

The promises of liveness (zmqfabric/discovery/liveness.py): a node's idle sockets do not grow
with the fabric (it keeps a few probe connections, not one per peer); a SIGKILLed node leaves
every view within DEAD_WITHIN_S; a node that stops cleanly leaves every view at once; and on a
secured fabric the probes (CURVE, with each record's key) find a killed node just the same.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fleet import Fleet, Member, fds
from tests.helpers import unique
from zmqfabric.security import keys

pytestmark = pytest.mark.slow

#: A SIGKILLed node leaves every view within this (s); a clean stop within LEFT_WITHIN_S.
DEAD_WITHIN_S = 3.0
LEFT_WITHIN_S = 1.0
#: Open file descriptors of an idle node, whatever the fabric's size.
FDS_MAX = 64
#: Starting and converging: generous, the machine is small and shared.
SLOW = 60.0


def start(fleet: Fleet, names: list[str]) -> list[Member]:
    members = [fleet.spawn(name) for name in names]
    assert fleet.wait(lambda: all(m.ready for m in members), SLOW), "nodes did not start"
    assert fleet.wait(fleet.full, SLOW), "the nodes did not all see each other"
    return members


def idle_fds(members: list[Member], timeout: float = 20.0) -> tuple[int, int]:
    """The file descriptors of an idle node, most and median over the nodes: each node's least
    over five looks 0.4 s apart (a probe or sync connection lives about a second), once the
    joins' short-lived connections have closed (two such rounds agree). On a loaded host one
    node can be amid a probe at every look: the median says what a node holds, the most bounds
    every node."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        looks = []
        for _ in range(5):
            looks.append([fds(m.pid) for m in members])
            time.sleep(0.4)
        least = sorted(min(column) for column in zip(*looks, strict=True))
        now = (least[-1], least[len(least) // 2])
        if now == last:
            return now
        last = now
    raise AssertionError(f"file descriptors still changing after {timeout} s (last: {last})")


def gone_within(fleet: Fleet, name: str, since: float, timeout: float) -> float:
    """How long after ``since`` the last live node dropped ``name`` (fails after timeout, with
    what the laggards logged about it)."""
    others = [m for m in fleet.alive() if m.name != name]
    done = fleet.wait(lambda: all(m.first("left", name, since) for m in others), timeout)
    late = [m.name for m in others if m.first("left", name, since) is None]
    assert done, f"{name} still listed by {late} {timeout} s later:\n" + "\n".join(
        line for who in late for line in fleet.log(who) if name in line)
    return max(m.first("left", name, since) or 0.0 for m in others) - since


def test_idle_sockets_do_not_grow_and_deaths_and_leaves_are_seen_quickly(tmp_path: Path) -> None:
    with Fleet(unique("scale"), logs=tmp_path) as fleet:
        small = start(fleet, [f"n{i:02d}" for i in range(10)])
        most_10, median_10 = idle_fds(small)
        everyone = small + start(fleet, [f"n{i:02d}" for i in range(10, 30)])
        most_30, median_30 = idle_fds(everyone)
        print(f"\nidle fds per node (most, median): {most_10}, {median_10} at 10 nodes, "
              f"{most_30}, {median_30} at 30")
        assert most_30 <= FDS_MAX
        # A socket per peer would add 20 or more to every node. A node keeps a connection to
        # each of its successors on the PROBE_SPREAD rings: at 10 nodes these coincide more
        # often (fewer kept), so the typical node at 30 is compared with the fullest at 10, give or
        # take one kept connection (4 descriptors with its monitor).
        assert median_30 <= most_10 + 4, "a node's sockets grow with the fabric"

        victim = everyone[7]
        killed_s = gone_within(fleet, victim.name, fleet.kill(victim), 2 * DEAD_WITHIN_S)
        leaver = everyone[20]
        left_s = gone_within(fleet, leaver.name, fleet.terminate(leaver), 2 * DEAD_WITHIN_S)
        print(f"SIGKILL seen by all 28 others in {killed_s:.3f} s, clean stop in {left_s:.3f} s")
        assert killed_s < DEAD_WITHIN_S
        assert left_s < LEFT_WITHIN_S
        assert fleet.wait(lambda: leaver.closed is not None, SLOW)
        # Nothing else was taken for dead meanwhile.
        lost = {n for m in fleet.alive() for k, _, n in m.events if k == "left"}
        assert lost == {victim.name, leaver.name}


def test_probes_over_curve_find_a_killed_node(tmp_path: Path) -> None:
    names = [f"s{i}" for i in range(4)]
    publics = {}
    with Fleet(unique("secured"), logs=tmp_path) as fleet:
        for name in names:
            fleet.keys[name] = tmp_path / name
            publics[name] = keys.generate(fleet.keys[name])
        for name in names:
            for other in names:
                if other != name:
                    keys.allow(fleet.keys[name], publics[other], other)
        members = start(fleet, names)
        idle_fds(members)
        fleet.collect()
        assert all(not m.counters.get("refused_handshakes") for m in members)
        killed_s = gone_within(fleet, "s2", fleet.kill(members[2]), 2 * DEAD_WITHIN_S)
        print(f"\nsecured: SIGKILL seen by the 3 others in {killed_s:.3f} s")
        assert killed_s < DEAD_WITHIN_S
        lost = {n for m in fleet.alive() for k, _, n in m.events if k == "left"}
        assert lost == {"s2"}
