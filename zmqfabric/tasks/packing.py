"""Reliable tasks: encoding task bodies for ``submit`` and ``submit_many`` without a msgpack
Packer per body (making one costs more than packing a small body).

``PACKERS`` holds idle Packers' ``pack``: a submitter pops one and appends it back when done.
Both are atomic, so no two threads share a Packer, even if packing a body runs Python code (a
dict subclass's ``items``) and another thread submits meanwhile. At most one per concurrent
submitter is kept. Any thread.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import msgpack

from ..core.wire import PACK_ERRORS

new_packer = msgpack.Packer
PACKERS: collections.deque[Callable[[Any], bytes]] = collections.deque(maxlen=16)


def pack_all(bodies: list[Any], most: int) -> list[bytes] | None:
    """Each body encoded (msgpack), with one borrowed Packer and no Python call per body; None
    when one cannot be encoded or is over ``most`` bytes (the caller's checks then say which)."""
    try:
        pack = PACKERS.pop()
    except IndexError:  # none idle
        pack = new_packer().pack
    try:
        payloads = list(map(pack, bodies))  # a Packer that raised is reset: it can be reused
    except PACK_ERRORS:
        return None
    finally:
        PACKERS.append(pack)
    return None if payloads and max(map(len, payloads)) > most else payloads
