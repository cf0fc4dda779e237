"""Coverage-guided fuzzing of the wire decoders (atheris; not collected by pytest).

Every decoder in :mod:`zmqfabric.core.wire` that reads bytes from a peer must either return a
decoded value or raise :class:`~zmqfabric.errors.RemoteProtocolError`; any other exception is a
crash (a bug: the node's ingress point would let it escape). Decoded values are also checked
against the spec (kinds, id range, error-reply shape).

Run:  python3 tests/fuzz/fuzz_wire.py -max_total_time=60 [-jobs=N] [CORPUS_DIR]
Pass ``-atheris_runs=N`` or any libFuzzer flag; see tests/fuzz/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import atheris

# Run as a script from anywhere: the checkout's package comes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports(include=["zmqfabric"]):
    from zmqfabric.core import wire
    from zmqfabric.errors import RemoteProtocolError

import msgpack

_MAX_ID = 2**64 - 1
_VALID_HEADER = wire.pack_header(wire.Kind.REQUEST, 7, 0.0)


def _frames(fdp: atheris.FuzzedDataProvider, most: int = 6) -> list[bytes]:
    """Split the input into 0..most frames; frames are often near-valid headers."""
    frames: list[bytes] = []
    for _ in range(fdp.ConsumeIntInRange(0, most)):
        style = fdp.ConsumeIntInRange(0, 5)
        if style == 0:  # canonical fixed fields of any kind byte, mutated id/timestamp/body
            kind = fdp.ConsumeIntInRange(0, 0x3F)
            array = 0x94 + fdp.ConsumeIntInRange(0, 2)  # header frame, message, with a map
            frames.append(bytes((array, 2, kind, 0xCF)) + fdp.ConsumeBytes(8) + b"\xcb"
                          + fdp.ConsumeBytes(8) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))
        elif style == 1:  # a msgpack header built from fuzzed fields of fuzzed types
            fields = [_value(fdp, fdp.ConsumeIntInRange(0, 3)),
                      _value(fdp, fdp.ConsumeIntInRange(0, 0x3F)),
                      _value(fdp, fdp.ConsumeInt(9)),
                      _value(fdp, fdp.ConsumeRegularFloat())]
            for _ in range(fdp.ConsumeIntInRange(0, 2)):  # a body, a header map
                fields.append(_value(fdp, {"enc": "raw"}))
            try:
                frames.append(msgpack.packb(fields))
            except (OverflowError, ValueError):
                frames.append(_VALID_HEADER)
        elif style == 2:
            frames.append(b"")
        elif style == 3:  # a short input repeated: frames beyond the size limits
            unit = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
            frames.append(unit * fdp.ConsumeIntInRange(1, 3000))
        else:
            frames.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)))
    return frames


def _value(fdp: atheris.FuzzedDataProvider, usual: object) -> object:
    """Usually ``usual``; sometimes a value of another msgpack type."""
    choice = fdp.ConsumeIntInRange(0, 11)
    others: list[Callable[[], object]] = [
        lambda: None, lambda: True, lambda: fdp.ConsumeInt(9), fdp.ConsumeRegularFloat,
        lambda: fdp.ConsumeUnicodeNoSurrogates(4), lambda: fdp.ConsumeBytes(4), lambda: [1],
        lambda: {1: 2}, lambda: {"enc": fdp.ConsumeUnicodeNoSurrogates(3)},
    ]
    return usual if choice >= len(others) else others[choice]()


def _check_header(header: wire.Header) -> None:
    assert isinstance(header.kind, wire.Kind), header
    assert type(header.msg_id) is int and 0 <= header.msg_id <= _MAX_ID, header
    assert type(header.timestamp) is float, header
    assert header.headers is None or (isinstance(header.headers, dict) and header.headers), header


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 6)
    try:
        if target == 0:
            _check_header(wire.unpack_header(fdp.ConsumeBytes(fdp.remaining_bytes())))
        elif target == 1:
            raw = fdp.ConsumeBool()
            body = fdp.ConsumeBytes(fdp.remaining_bytes())
            value = wire.unpack_body(body, raw)
            assert not raw or value == body
        elif target == 2:
            frames = _frames(fdp)
            route, rest = wire.split_route(frames)
            assert route and route[-1] == b"" and all(route[:-1]) and route + rest == frames
        elif target == 3:
            header, _ = wire.parse_request(_frames(fdp))
            _check_header(header)
            assert header.kind is wire.Kind.REQUEST
        elif target == 4:
            header, body = wire.parse_reply(_frames(fdp))
            _check_header(header)
            assert header.kind in (wire.Kind.REPLY, wire.Kind.ERROR)
            if header.kind is wire.Kind.ERROR:
                assert isinstance(body["type"], str) and isinstance(body["message"], str)
        elif target == 5:
            for message in wire.parse_event(_frames(fdp)):
                assert message.kind is wire.Kind.EVENT and isinstance(message.topic, str)
                assert len(message.topic.encode()) <= 1024
        else:
            for message in wire.parse_message(_frames(fdp)):
                assert message.kind is wire.Kind.MESSAGE and message.topic is None
    except RemoteProtocolError:
        pass  # refused: the one allowed failure


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
