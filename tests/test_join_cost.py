"""What a join costs the nodes already there, on mDNS (PROTOCOL.md 4.7 "Joining without asking").

A querying browser made every node answer each newcomer by multicast, which every node of a host
parses: O(N) packets per node and join, and 300 nodes on one host never finished starting. Now a
newcomer learns the fabric from the calls that verify it, so the nodes already there send nothing
on mDNS for it; and a node learned that way is still dropped at its goodbye. Real nodes and a
passive listener on loopback (it only receives, and counts packets carrying one node's records,
so other processes' mDNS does not count).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import Iterator

import pytest
from zeroconf import DNSIncoming

import zmqfabric as zf
from tests.helpers import unique, wait_until
from tests.test_verify_load import _control_dealer, _send_control
from zmqfabric.constants import ANNOUNCE_INTERVAL_S, ANNOUNCEMENTS, JOIN_QUERY_DELAY_S
from zmqfabric.core.records import encode_txt, instance_name

pytestmark = pytest.mark.slow

SLOW = 15.0
#: A clean leave reaches the peers within this (README: "a clean stop in a few ms").
QUICK = 1.0
MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353


@contextlib.contextmanager
def mdns_listener() -> Iterator[socket.socket]:
    """A socket that receives the mDNS group on loopback, as every zeroconf of the host does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Only the group joined below, on loopback (Linux otherwise delivers every group any
        # socket of the host joined, on any interface).
        sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MULTICAST_ALL", 49), 0)
        sock.bind((MDNS_GROUP, MDNS_PORT))
        membership = struct.pack("4s4s", socket.inet_aton(MDNS_GROUP),
                                 socket.inet_aton("127.0.0.1"))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        sock.settimeout(0.05)
        yield sock
    finally:
        sock.close()


def answers_naming(sock: socket.socket, instance: str, until: float) -> int:
    """mDNS responses received until ``until`` (monotonic) with an answer about ``instance``."""
    count = 0
    wanted = instance.lower()
    while time.monotonic() < until:
        try:
            data, addr = sock.recvfrom(9000)
        except TimeoutError:
            continue
        msg = DNSIncoming(data, (addr[0], addr[1]))
        if not msg.valid or msg.is_query():
            continue
        if any(wanted in (r.name.lower(), getattr(r, "alias", "").lower())
               for r in msg.answers()):
            count += 1
    return count


def quiet(sock: socket.socket, instance: str, gap: float, timeout: float) -> bool:
    """Wait until ``gap`` seconds pass with no response about ``instance`` (False after
    ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers_naming(sock, instance, min(deadline, time.monotonic() + gap)) == 0:
            return True
    return False


def test_the_nodes_there_send_nothing_on_mdns_for_a_newcomer(make_node) -> None:
    """With the querying browser, the node there answered the newcomer's queries by multicast
    (1-2 packets within 3 s, every node of the fabric doing the same). Now: none, and each still
    lists the other at once (the newcomer from the call that verified it)."""
    with mdns_listener() as sock:
        there = make_node("there")
        mine = instance_name(there.name, there.node_id)
        # Past its announcements (two, 225 ms apart): what follows would be answers.
        assert quiet(sock, mine, 0.6, SLOW), f"{there.name} kept announcing"
        newcomer = make_node("newcomer")
        started = time.monotonic()
        assert wait_until(lambda: newcomer.name in [n.name for n in there.nodes()], SLOW)
        assert wait_until(lambda: there.name in [n.name for n in newcomer.nodes()], SLOW)
        # The newcomer's one query leaves 1-2 s after it starts: watch until after it.
        heard = answers_naming(sock, mine, started + 2 * JOIN_QUERY_DELAY_S + 1.0)
    assert heard == 0, f"the node there multicast its record {heard} times for one newcomer"


def test_a_node_learned_from_its_call_leaves_at_its_goodbye(make_node) -> None:
    """The newcomer never heard the older node's announcement (it was sent before the newcomer
    started): it learned it from its verification call. Its clean stop still reaches the
    newcomer at once."""
    older = zf.Node(unique("older"))
    older.start()
    try:
        newcomer = make_node("newcomer")
        assert wait_until(lambda: older.name in [n.name for n in newcomer.nodes()], SLOW)
    finally:
        stopped = time.monotonic()
        older.close()
    assert wait_until(lambda: older.name not in [n.name for n in newcomer.nodes()], SLOW)
    gone = time.monotonic() - stopped
    assert gone < QUICK, f"{older.name} was listed {gone:.2f} s after its clean stop"


#: How long no hello may arrive once both nodes list each other: the greeting is posted before
#: the newcomer is listed, and a hello on loopback arrives within milliseconds.
HELLO_QUIET_S = 1.5


def test_nodes_that_verified_each_other_with_their_records_send_no_hello(make_node) -> None:
    """A newcomer and the node there call each other once, each call carrying the caller's
    record (``me``), so neither greets the other (PROTOCOL.md 6.4). The node there used to
    greet it all the same (its directory's listener ran before the call was marked as an
    introduction): a hello per join at every node, from a socket of its own, and one more record
    for the newcomer to decode and check."""
    fabric = unique("hellos")  # a fabric of its own: no other node calls or greets these
    there = make_node("there", config=zf.NodeConfig(fabric=fabric))
    new = make_node("new", config=zf.NodeConfig(fabric=fabric))
    wait_until(lambda: there.directory.get(new.name) and new.directory.get(there.name), SLOW,
               "both nodes listing each other")
    for node in (there, new):  # each called the other, with its record
        wait_until(lambda node=node: node.counters.snapshot().get("hints_verified", 0) >= 1,
                   SLOW, f"{node.name} verifying its peer")
    deadline = time.monotonic() + HELLO_QUIET_S
    while time.monotonic() < deadline:
        got = {n.name: n.counters.snapshot().get("hellos_received", 0) for n in (there, new)}
        assert not any(got.values()), f"hellos received after calls that carried 'me': {got}"
        time.sleep(0.05)


def test_a_hello_of_the_record_held_is_not_checked_again_and_a_newer_one_is(make_node,
                                                                             raw) -> None:
    """The newcomer's call back to each node there carries the newcomer's record, which that
    node holds already (it verified it): skipped undecoded (``hellos_known``), no call made. The
    same record at a higher seq is news, and is verified with its node."""
    fabric = unique("known")
    there = make_node("there", config=zf.NodeConfig(fabric=fabric))
    peer = make_node("peer", config=zf.NodeConfig(fabric=fabric))
    wait_until(lambda: there.directory.get(peer.name) and peer.directory.get(there.name), SLOW,
               "both nodes listing each other")
    before = there.counters.snapshot()
    dealer = _control_dealer(raw, there)  # from 127.0.0.1, the peer's address
    held = {"name": peer.name, "txt": encode_txt(peer.record)}
    _send_control(dealer, 0, {"op": "hello", **held})
    wait_until(lambda: there.counters.snapshot().get("hellos_known", 0)
               > before.get("hellos_known", 0), SLOW, "the held record skipped")
    newer = {"name": peer.name, "txt": {**held["txt"], "seq": str(peer.record.seq + 1)}}
    _send_control(dealer, 0, {"op": "hello", **newer})
    wait_until(lambda: there.counters.snapshot().get("hints_corrected", 0)
               > before.get("hints_corrected", 0), SLOW,
               "the newer claim verified with its node (which answers its true seq)")
    after = there.counters.snapshot()
    assert after.get("verifications", 0) == before.get("verifications", 0) + 1
    assert after.get("hellos_known", 0) == before.get("hellos_known", 0) + 1


def test_a_node_announces_its_record_twice_not_three_times(make_node) -> None:
    """Every node of a host parses every announcement of every newcomer: python-zeroconf's
    third copy cost each node there a packet per join. Two (RFC 6762 8.3's least), at start
    and at each update. (Another program's query on this loopback could add an answer: more,
    never fewer.)"""
    with mdns_listener() as sock:
        node = make_node("announcer", config=zf.NodeConfig(fabric=unique("announce")))
        mine = instance_name(node.name, node.node_id)
        started = time.monotonic()
        heard = answers_naming(sock, mine, started + 4 * ANNOUNCE_INTERVAL_S + 1.0)
        assert heard == ANNOUNCEMENTS, f"{heard} announcements at start"
