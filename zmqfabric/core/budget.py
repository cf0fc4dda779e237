"""What decoding a msgpack body would cost, found before decoding it. Pure: no IO.

msgpack turns one byte into a Python object of 40-90 bytes (an empty array, an empty map, a
negative integer outside CPython's cache), so a crafted body of a few megabytes could cost
gigabytes and seconds. :func:`expansion_cost` walks the tokens (skipping string and binary
payloads) and adds up what each will cost, measured on CPython 3.11 with tracemalloc (the 8-byte
slot in its parent included): an object CPython caches (small integers, nil, booleans, strings
and binaries of 0-1 bytes) costs 8, an integer 40, a float 32, a string 58 + its length, a
binary 42 + its length, an extension type 120 + its length, an array 64, a map 176 (up to 5
entries) or 72 + 24 per entry. It stops at the first byte where the running cost exceeds the
budget, so a crafted body is refused after reading a few kilobytes of it.
"""

from __future__ import annotations

import struct
from typing import Final

_U16: Final = struct.Struct(">H").unpack_from
_U32: Final = struct.Struct(">I").unpack_from
#: Bytes after the marker of fixed-size scalars: uint8..64 (cc-cf), int8..64 (d0-d3).
_INT_SIZE: Final = {0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
#: Payload sizes of fixext 1, 2, 4, 8, 16 (d4-d8).
_FIXEXT: Final = (1, 2, 4, 8, 16)
#: Cached objects: nil, false, true, and the negative fixints -5..-1 (fb-ff).
_CACHED: Final = frozenset({0xC0, 0xC2, 0xC3, 0xFB, 0xFC, 0xFD, 0xFE, 0xFF})


def _map_cost(entries: int) -> int:
    return 176 if entries <= 5 else 72 + 24 * entries


def expansion_cost(data: bytes | memoryview, per_byte: int, allowance: int) -> int:
    """The approximate bytes of Python objects that decoding ``data`` makes, or -1 as soon as
    the running cost exceeds ``per_byte`` times the bytes read so far plus ``allowance``.

    Does not validate: a malformed body gets some cost here and is refused by the decoder."""
    n = len(data)
    i = 0
    cost = 0
    while i < n:
        b = data[i]
        if b < 0x80 or b in _CACHED:
            cost += 8
            i += 1
            continue  # the cheapest and commonest token: no budget check
        if b < 0x90:
            cost += _map_cost(b & 15)
            i += 1
        elif b < 0xA0:
            cost += 64
            i += 1
        elif b < 0xC0:
            length = b & 31
            cost += 8 if length < 2 else 58 + length
            i += 1 + length
        elif b >= 0xE0:
            cost += 40
            i += 1
        elif b == 0xCC:
            cost += 8  # uint8: 128-255, all cached
            i += 2
        elif b in _INT_SIZE:
            cost += 40
            i += 1 + _INT_SIZE[b]
        elif b == 0xCA or b == 0xCB:
            cost += 32
            i += 5 if b == 0xCA else 9
        elif b in (0xC4, 0xD9):
            if i + 1 >= n:
                break
            length = data[i + 1]
            cost += 8 if length < 2 else (42 if b == 0xC4 else 58) + length
            i += 2 + length
        elif b in (0xC5, 0xDA, 0xDC, 0xDE):
            if i + 2 >= n:
                break
            count = _U16(data, i + 1)[0]
            cost += _sized_cost(b, count)
            i += 3 + (count if b in (0xC5, 0xDA) else 0)
        elif b in (0xC6, 0xDB, 0xDD, 0xDF):
            if i + 4 >= n:
                break
            count = _U32(data, i + 1)[0]
            cost += _sized_cost(b, min(count, n))
            i += 5 + (count if b in (0xC6, 0xDB) else 0)
        elif 0xD4 <= b <= 0xD8:
            length = _FIXEXT[b - 0xD4]
            cost += 120 + length
            i += 2 + length
        elif b in (0xC7, 0xC8, 0xC9):
            head = (2, 3, 5)[b - 0xC7]
            if i + head >= n:
                break
            if b == 0xC7:
                length = data[i + 1]
            elif b == 0xC8:
                length = _U16(data, i + 1)[0]
            else:
                length = _U32(data, i + 1)[0]
            cost += 120 + length
            i += 1 + head + length
        else:  # 0xc1 is never used: the decoder refuses the body
            break
        if cost > per_byte * i + allowance:
            return -1
    return cost


def _sized_cost(marker: int, count: int) -> int:
    """Cost of a str/bin/array/map with a 16- or 32-bit length or count."""
    if marker in (0xC5, 0xC6):  # bin 16/32
        return 8 if count < 2 else 42 + count
    if marker in (0xDA, 0xDB):  # str 16/32
        return 8 if count < 2 else 58 + count
    if marker in (0xDC, 0xDD):  # array 16/32
        return 64
    return _map_cost(count)  # map 16/32
