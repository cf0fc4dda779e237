"""What the senders of a stream (``Publisher``) and of a pipeline (``Pusher``, ``AsyncPusher``)
share to frame a message: a pre-packed header prefix, one msgpack Packer per handle and a
sequence number, in the layout of :mod:`zmqfabric.core.wire`."""

from __future__ import annotations

import time
from typing import Any, Callable

import msgpack

from ..constants import ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.wire import FLOAT64, pack_canonical

#: Body types that travel as a raw frame, without a copy, from ZERO_COPY_THRESHOLD bytes on.
BINARY = (bytes, bytearray, memoryview)


class Encoder:
    """Pre-packed message framing (a mixin): a header prefix per kind, one msgpack Packer per
    handle (``msgpack.packb`` builds one per call), a sequence number. The sync ``send`` methods
    of ``Publisher`` and ``Pusher`` inline ``_encode``; keep them in step."""

    _kind: wire.Kind
    _prefix: bytes
    _pack: Callable[[Any], bytes]
    _seq: int

    def _init_encoder(self, kind: wire.Kind) -> None:
        self._kind = kind
        self._prefix = wire.HEADER_PREFIX[kind]
        self._pack = msgpack.Packer().pack
        self._seq = 0

    def _encode(self, body: Any) -> tuple[list[Any], bool]:
        """(header + body frames, copy flag). Large bytes bodies go raw and uncopied.
        Raises LocalProtocolError for a body msgpack cannot encode."""
        self._seq += 1
        if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
            header = wire.pack_header(self._kind, self._seq, time.time(), wire.RAW_HEADERS)
            return [header, body], False
        try:
            data = self._pack(body)
        except wire.PACK_ERRORS as exc:
            raise wire.unencodable(exc) from exc
        return [pack_canonical(self._prefix, self._seq, FLOAT64, time.time()), data], True
