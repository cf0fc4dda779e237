"""Timing and frame helpers of the hot path, shared by every pattern.

Deadlines are monotonic. The frame helpers do what pyzmq's ``send_multipart``/``recv_multipart``
do with the C-level methods: those are Python loops that pay, per frame, for the Python wrapper of
``Socket.send`` (routing ids, groups) and for ``getsockopt(RCVMORE)``, which builds an enum:
together about 1 us per frame.
"""

from __future__ import annotations

import time
from typing import Any

import zmq


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _ms_left(deadline: float | None) -> int | None:
    """Milliseconds to ``deadline`` for a poll: None = forever, 0 = passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    return 0 if left <= 0 else max(1, int(left * 1000))


def _s_left(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())



#: Flags as plain ints: or-ing zmq's Flag enums costs about a microsecond per call.
NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE)
#: The C method under pyzmq's Python ``Socket.send`` wrapper.
_SEND = zmq.backend.Socket.send


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


def recv_frames(sock: zmq.Socket[Any], flags: int) -> list[bytes]:
    """``sock.recv_multipart(flags)``: a Frame's ``more`` replaces getsockopt(RCVMORE). The rest
    of a message is there once its first frame is, so only the first receive can raise Again."""
    frame = sock.recv(flags, False)
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(NOBLOCK, False)
        frames.append(frame.bytes)
    return frames
