"""The byte layout of the zmqfabric wire format, version 2: kinds, headers, the canonical
encodings the fast paths test for. Pure: no IO, no clock. The specification is
``docs/PROTOCOL.md`` (section 5); :mod:`zmqfabric.core.wire` is the public face of this module.

A message is one of two forms:

- **one frame** (the rule): the msgpack array ``[2, kind, msg_id, timestamp, body]``, or
  ``[2, kind, msg_id, timestamp, body, headers]`` with a header map;
- **a header frame and a body frame** (large raw bodies, sent without a copy, and any sender
  that prefers it): the header ``[2, kind | 16, msg_id, timestamp]`` or ``[2, kind | 16,
  msg_id, timestamp, headers]`` (the kind with the FOLLOWS bit: "the body is the next frame"),
  then the body as msgpack, or as raw bytes under ``"enc": "raw"``.

A batch is one frame ``[2, kind | 32, first_id, timestamp, [body, ...]]``: the bodies of
messages ``first_id``, ``first_id + 1``, ... in order (pipelines and streams).

Version 1 (a header frame ``[1, ...]`` then a body frame) is refused: a v2 node speaks v2 only
(PROTOCOL.md, "Versioning").
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Mapping

from ..constants import PROTOCOL_VERSION


class Kind(enum.IntEnum):
    REQUEST = 1
    REPLY = 2
    ERROR = 3
    EVENT = 4
    MESSAGE = 5
    TASK = 6
    RESULT = 7
    CREDIT = 8


KINDS: Final = frozenset(int(k) for k in Kind)
MAX_ID: Final = 2**64 - 1
RAW_HEADERS: Final = {"enc": "raw"}
#: The kind bit of a header frame whose body is the next frame.
FOLLOWS: Final = 0x10
#: The kind bit of a batch frame (pipelines and streams).
BATCH: Final = 0x20

# --- canonical encodings: the byte layout every fast path uses -------------------------------
# Senders write the fixed fields with one struct call and a pre-packed 4-byte prefix per kind;
# receivers recognise a message with two byte tests, written inline on the hot paths of
# patterns/ (a call per message would cost more than the tests), always in this form:
#
#     data.startswith(prefix) and data[FLOAT64_AT] == FLOAT64
#
# then decode the whole frame with one ``msgpack.unpackb`` and take item 4 (the body); the
# prefix fixes the array's length, the version, the kind and the id's encoding (uint64), the
# tag the timestamp's (float64). Any other encoding, a header map, a bad version or kind goes
# to the reference parsers of :mod:`zmqfabric.core.wire`, so every message meets the same
# checks. ``tests/test_fastpath.py`` checks each inlined decoder against the parsers.

#: ``CANONICAL.pack(prefix, msg_id, FLOAT64, timestamp)``: an array's first four items (21
#: bytes); struct refuses ids outside uint64 (struct.error).
CANONICAL: Final = struct.Struct(">4sQBd")
pack_canonical: Final = CANONICAL.pack
unpack_canonical: Final = CANONICAL.unpack
unpack_canonical_from: Final = CANONICAL.unpack_from
#: The length of the canonical fixed fields: prefix (4), uint64 id (8), float64 tag (1) and
#: timestamp (8).
HEADER_SIZE: Final = CANONICAL.size
#: Where the msgpack float64 tag sits (after the prefix and the id).
FLOAT64_AT: Final = 12
FLOAT64: Final = 0xCB


def _prefixes(array: int, bit: int) -> Mapping[Kind, bytes]:
    return MappingProxyType(
        {kind: bytes((array, PROTOCOL_VERSION, kind | bit, 0xCF)) for kind in Kind}
    )


#: A one-frame message ``[2, kind, id, ts, body]``: fixarray(5), version, kind, uint64 tag.
MESSAGE_PREFIX: Final = _prefixes(0x95, 0)
#: A one-frame message with a header map ``[2, kind, id, ts, body, headers]``.
MAPPED_PREFIX: Final = _prefixes(0x96, 0)
#: A header frame ``[2, kind | FOLLOWS, id, ts]`` (the body is the next frame).
HEADER_PREFIX: Final = _prefixes(0x94, FOLLOWS)
#: A batch frame ``[2, kind | BATCH, first_id, ts, [bodies]]``.
BATCH_PREFIX: Final = _prefixes(0x95, BATCH)
#: The header frame of a raw body ``[2, kind | FOLLOWS, id, ts, {"enc": "raw"}]``: this prefix,
#: the id and timestamp as in CANONICAL, then RAW_MAP (RAW_HEADER_SIZE bytes in all).
RAW_PREFIX: Final = _prefixes(0x95, FOLLOWS)
#: ``{"enc": "raw"}`` packed: fixmap(1), fixstr "enc", fixstr "raw".
RAW_MAP: Final = b"\x81\xa3enc\xa3raw"
RAW_HEADER_SIZE: Final = CANONICAL.size + len(RAW_MAP)


@dataclass(frozen=True, slots=True)
class Header:
    """A message's fixed fields. ``follows``: the body is the next frame (``raw``: as bytes);
    ``batch``: the body is a list of the bodies of messages ``msg_id``, ``msg_id + 1``, ..."""

    kind: Kind
    msg_id: int
    timestamp: float
    headers: dict[str, Any] | None = None
    follows: bool = False
    batch: bool = False

    @property
    def raw(self) -> bool:
        return bool(self.headers) and self.headers.get("enc") == "raw"  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded message: what a receiver sees of one wire message."""

    kind: Kind
    msg_id: int
    timestamp: float
    body: Any
    topic: str | None = None
    headers: dict[str, Any] | None = None
