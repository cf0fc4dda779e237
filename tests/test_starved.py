"""A starved node is slow, not dead (README "Liveness"; discovery/probing.py).

On one host hundreds of nodes can starve each other: a node whose process is not scheduled
stops taking connections once its listen queue is full, so the probers' check of its control port
gets no answer at all. On loopback the kernel answers a connect at once, taken or refused, so an
unanswered check means a starved host, not a dead process (a dead one's port refuses at once):
the node gets the time of a live but slow one (SLOW_PEER_S), instead of being buried in seconds
and readmitted by every node (300 nodes starting on one 2-core host buried newcomers that way).

Here the node is frozen (SIGSTOP) and its listen queue filled with raw connects, so that a new
connect hangs; before, it was dropped within a few seconds.
"""

from __future__ import annotations

import contextlib
import errno
import select
import signal
import socket
import time
from typing import Iterator

import pytest

from tests.helpers import wait_until
from tests.procs import ProcessGroup
from zmqfabric.constants import SLOW_PEER_S

pytestmark = pytest.mark.slow

SLOW = 15.0
#: How long the frozen node must stay listed: well past a suspicion's time (a few seconds), well
#: short of SLOW_PEER_S.
KEPT_S = 8.0
#: Raw connects that fill the frozen node's listen queue (ZeroMQ's backlog is 100).
FILLERS = 400

NODE = """
import zmqfabric as zf
node = zf.Node({name!r})
node.start()
print("READY", flush=True)
node.run(timeout=120)
node.close()
"""


def hangs(port: int) -> bool:
    """A connect to 127.0.0.1:``port`` is not answered within 0.3 s (the queue is full)."""
    with socket.socket() as sock:
        sock.setblocking(False)
        if sock.connect_ex(("127.0.0.1", port)) not in (errno.EINPROGRESS, errno.EAGAIN):
            return False
        _, writable, _ = select.select([], [sock], [], 0.3)
        return not writable


@contextlib.contextmanager
def full_listen_queue(port: int) -> Iterator[None]:
    socks: list[socket.socket] = []
    try:
        for _ in range(FILLERS):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            socks.append(sock)
        yield
    finally:
        for sock in socks:
            sock.close()


def test_a_frozen_node_whose_port_takes_no_connection_is_kept(make_node, name,
                                                              procs: ProcessGroup) -> None:
    watcher = make_node("watcher")
    frozen_name = name("frozen")
    frozen = procs.python(NODE.format(name=frozen_name))
    record = wait_until(lambda: watcher.directory.get(frozen_name), SLOW, "the node listed")
    assert record.control is not None
    frozen.signal(signal.SIGSTOP)
    try:
        with full_listen_queue(record.control.port):
            assert wait_until(lambda: hangs(record.control.port), SLOW, "a full listen queue")
            start = time.monotonic()
            while time.monotonic() - start < KEPT_S:
                listed = watcher.directory.get(frozen_name) is not None
                assert listed, (f"{frozen_name} dropped {time.monotonic() - start:.1f} s after "
                                f"its port stopped taking connections (SLOW_PEER_S is "
                                f"{SLOW_PEER_S} s)")
                time.sleep(0.1)
    finally:
        frozen.signal(signal.SIGCONT)
    assert frozen.stop() == 0
