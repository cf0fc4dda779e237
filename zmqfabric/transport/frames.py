"""Timing and frame helpers of the hot path, shared by every pattern.

Deadlines are monotonic. The frame helpers do what pyzmq's ``send_multipart``/``recv_multipart``
do with the C-level methods: those are Python loops that pay, per frame, for the Python wrapper of
``Socket.send`` (routing ids, groups) and for ``getsockopt(RCVMORE)``, which builds an enum:
together about 1 us per frame.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any, cast

import zmq

from ..constants import ZERO_COPY_THRESHOLD


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def ms_left(deadline: float | None) -> int | None:
    """Milliseconds to ``deadline`` for a poll: None = forever, 0 = passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    return 0 if left <= 0 else max(1, int(left * 1000))


def s_left(deadline: float | None) -> float | None:
    """Seconds to ``deadline`` for ``asyncio.wait_for``: None = forever, 0.0 = passed."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


#: A blocking receive waits with the socket's receive timeout (RCVTIMEO), as a raw socket does.
#: Setting it costs about a microsecond, so a socket keeps the one it has while that overshoots
#: the wait wanted by at most max(RCVTIMEO_SLACK_MIN_MS, wait >> RCVTIMEO_SLACK_SHIFT): 1/64 of a
#: long wait, so that a deadline counting down resets it rarely; 2 ms of a short one, so that a
#: fresh deadline of the same timeout, which reads a millisecond less from one call to the next,
#: resets nothing. The larger of the two, not their sum: the floor only matters for short waits,
#: and a long wait need not overshoot by 2 ms more. Never shorter than wanted (a receive does not
#: time out before its deadline), and a wait of 0 (do not block) is never stretched.
RCVTIMEO_SLACK_SHIFT = 6
RCVTIMEO_SLACK_MIN_MS = 2


def sticky_rcvtimeo(sock: zmq.Socket[Any], have: int, want: int) -> int:
    """Prepare ``sock`` for a blocking receive that should wait ``want`` ms (-1: forever, 0: not
    at all) and return its receive timeout now. ``have`` is the receive timeout last set (-1:
    none); it stays when it equals ``want``, or when ``want`` is positive and ``have`` is at
    least ``want`` and at most ``want`` plus the slack above. Hot paths call this only when
    ``want != have``. Raises zmq.ZMQError for a closed socket. Call from the socket's thread."""
    if have != want and (
        want <= 0
        or not want <= have <= want + max(RCVTIMEO_SLACK_MIN_MS, want >> RCVTIMEO_SLACK_SHIFT)
    ):
        sock.setsockopt(zmq.RCVTIMEO, want)
        return want
    return have


#: Flags as plain ints: or-ing zmq's Flag enums costs about a microsecond per call.
NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE)
#: The C methods under pyzmq's Python ``Socket.send``/``recv`` wrappers.
_SEND = zmq.backend.Socket.send
_RECV = zmq.backend.Socket.recv
#: For hot paths that send a known frame layout inline: ``csend(sock, data, flags)`` is the C
#: send (copy by default), ``MORE_NOBLOCK`` the flags of a frame that is not the last.
csend = _SEND
#: ``crecv(sock, flags, copy)``: the C receive (a Frame with copy=False), for the same use.
crecv = _RECV
MORE_NOBLOCK = NOBLOCK | _MORE


def send_frames(
    sock: zmq.Socket[Any], frames: list[Any], flags: int, copy: bool = True
) -> None:
    """``sock.send_multipart(frames, flags)`` without the wrapper; ``copy=False`` applies to the
    last frame only (large bodies). Raises zmq.Again if nothing was queued (with NOBLOCK): once
    the first frame is accepted, ZeroMQ accepts the rest of the message."""
    more = flags | _MORE
    last = len(frames) - 1
    for i in range(last):
        _SEND(sock, frames[i], more)
    _SEND(sock, frames[last], flags, copy)


def recv_frames(sock: zmq.Socket[Any], flags: int, keep: bool = False) -> list[Any]:
    """``sock.recv_multipart(flags)``: a Frame's ``more`` replaces getsockopt(RCVMORE). The rest
    of a message is there once its first frame is, so only the first receive can raise Again.
    Frames are bytes; with ``keep``, a frame after the first of ZERO_COPY_THRESHOLD bytes or
    more is a memoryview over the received frame instead, not copied (see :func:`body_of`).

    ZeroMQ's MAXMSGSIZE bounds each frame; the whole message is bounded here: one whose frames
    add up to more than MAXMSGSIZE is read to its end, dropped frame by frame, and returned as
    ``[]`` (every parser refuses an empty message and counts it)."""
    frame = _RECV(sock, flags, False)  # the C method: no lookup through pyzmq's Socket class
    frames: list[Any] = [frame.bytes]
    if frame.more:
        total = len(frames[0])
        while frame.more:
            frame = _RECV(sock, NOBLOCK, False)
            data = body_of(frame) if keep else frame.bytes
            frames.append(data)
            total += len(data)
            if total > _SMALL and 0 <= cast(int, sock.get(_MAXMSGSIZE)) < total:
                return _discard(sock, frame)
    return frames


def recv_routed(sock: zmq.Socket[Any], flags: int) -> list[bytes]:
    """:func:`recv_frames` for a ROUTER socket: its first frame, the routing id ZeroMQ puts in
    front of every message, is always followed by another, so it is received as bytes without a
    Frame (half a microsecond each). Raises and bounds as :func:`recv_frames`."""
    route = _RECV(sock, flags)
    frames = recv_frames(sock, NOBLOCK)  # the rest (the size bound leaves out the route's bytes)
    if frames:
        frames.insert(0, route)
    return frames


def send_routed(sock: zmq.Socket[Any], route: list[bytes], data: Any, flags: int) -> None:
    """``send_frames(sock, route + [data], flags)`` without building the list (replies)."""
    more = flags | _MORE
    for frame in route:
        _SEND(sock, frame, more)
    _SEND(sock, data, flags)


def recv_rest(sock: zmq.Socket[Any], first: bytes, keep: bool = False) -> list[Any]:
    """The frames of a message whose first frame ``first`` was received as bytes (which says
    nothing of what follows): ``[first]`` when it was the last, else all of them, bounded and
    (``keep``) large frames kept as in :func:`recv_frames`. One getsockopt(RCVMORE): for the
    rare messages of several frames, not for the one-frame messages of the hot paths."""
    if not sock.get(_RCVMORE):
        return [first]
    frames: list[Any] = [first]
    total = len(first)
    more = True
    while more:
        frame = sock.recv(NOBLOCK, False)
        data = body_of(frame) if keep else frame.bytes
        frames.append(data)
        total += len(data)
        more = frame.more
        if total > _SMALL and 0 <= cast(int, sock.get(_MAXMSGSIZE)) < total:
            return _discard(sock, frame)
    return frames


def body_of(frame: zmq.Frame) -> bytes | memoryview:
    """A received frame's bytes; from ZERO_COPY_THRESHOLD bytes on, a memoryview over the frame
    instead (it keeps the frame alive): bytes would copy it, which for a 1 MiB body costs as much
    as the receive itself (a third of the receiver's time)."""
    return frame.buffer if len(frame) >= ZERO_COPY_THRESHOLD else frame.bytes


_RCVMORE = int(zmq.RCVMORE)
#: Messages smaller than this are never checked against MAXMSGSIZE (which is larger).
_SMALL = 64 * 1024
_MAXMSGSIZE = int(zmq.MAXMSGSIZE)


def _discard(sock: zmq.Socket[Any], frame: zmq.Frame) -> list[bytes]:
    """Read and drop the rest of an oversized message; the caller refuses the ``[]``."""
    while frame.more:
        frame = sock.recv(NOBLOCK, False)
    return []


#: Keys the wake tokens of this process's sockets (SocketWaker).
_WAKE_SECRET = os.urandom(16)


class SocketWaker:
    """Wakes the thread blocked in a receive on a bound socket: ZeroMQ cannot interrupt a
    blocking receive, so the waker sends the socket a message, through an inproc connection of
    its own (no CURVE handshake, no ZAP: inproc has no security mechanism), that the receiving
    thread recognises by :meth:`is_wake` and drops. A thread that blocks in the socket's receive
    instead of polling it next to a wake-up pipe saves the poll's system calls on every message.

    ``sock`` (a ROUTER: the message arrives as ``[peer id, token]``) must be bound, and this is
    made and closed by the thread that owns ``sock`` while its receiving thread does not run
    (made before it starts, closed after it ended). :meth:`wake` is thread-safe and never
    blocks; :meth:`close` is idempotent."""

    __slots__ = ("token", "_sock", "_address", "_waker", "_lock")

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        #: The wake message's body: secret (no peer can send one), and the same for every waker
        #: of ``sock``: a wake that a driver stopped before reading stays in the socket, and the
        #: next run's driver must still know it for one (it counted it as a malformed request).
        self.token = hashlib.blake2b(id(sock).to_bytes(8, "little"), key=_WAKE_SECRET,
                                     digest_size=16).digest()
        self._sock = sock
        self._address = f"inproc://zmqfabric-wake-{os.urandom(8).hex()}"
        self._lock = threading.Lock()
        sock.bind(self._address)
        # A plain socket even on an asyncio context: wake() is a blocking-API call.
        self._waker: zmq.Socket[Any] | None = zmq.Socket(sock.context, zmq.DEALER)
        self._waker.setsockopt(zmq.LINGER, 0)
        self._waker.connect(self._address)

    def wake(self) -> None:
        """Send the wake message (dropped when the waker's queue is full: the receiver has wakes
        waiting already). Thread-safe; a no-op once closed."""
        with self._lock:
            if self._waker is not None:
                try:
                    _SEND(self._waker, self.token, NOBLOCK)
                except zmq.ZMQError:
                    pass

    def is_wake(self, frames: list[bytes]) -> bool:
        """True for the frames of a wake message."""
        return len(frames) == 2 and frames[1] == self.token

    def close(self, unbind: bool = True) -> None:
        """Close the waker's socket and, with ``unbind``, unbind ``sock`` from its inproc
        address (only while no thread receives on ``sock``). Idempotent; never raises."""
        with self._lock:
            waker, self._waker = self._waker, None
        if waker is None:
            return
        waker.close(0)
        if unbind:
            try:
                self._sock.unbind(self._address)
            except zmq.ZMQError:  # the socket was closed meanwhile
                pass
