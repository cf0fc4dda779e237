"""What the senders of a stream (``Publisher``) and of a pipeline (``Pusher``, ``AsyncPusher``)
share to frame a message: a pre-packed header prefix, one msgpack Packer per handle, a sequence
number and the size limit, in the layout of :mod:`zmqfabric.core.wire`.

The size limit is the node's ``max_message_size``, which every receiver enforces with ZeroMQ's
MAXMSGSIZE (per frame): a peer that receives a larger frame drops the connection. So senders check
the body frame's length (the other frames are bounded far below any limit) and raise
:class:`~zmqfabric.errors.MessageTooLargeError` before anything is sent."""

from __future__ import annotations

import time
from typing import Any, Callable

import msgpack

from ..constants import ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.wire import FLOAT64, pack_canonical
from ..errors import MessageTooLargeError

#: Body types that travel as a raw frame, without a copy, from ZERO_COPY_THRESHOLD bytes on.
BINARY = (bytes, bytearray, memoryview)


def nbytes(body: bytes | bytearray | memoryview) -> int:
    """The size in bytes of a raw body (a memoryview's items may be wider than a byte)."""
    return body.nbytes if isinstance(body, memoryview) else len(body)


class Encoder:
    """Pre-packed message framing (a mixin): a header prefix per kind, one msgpack Packer per
    handle (``msgpack.packb`` builds one per call), a sequence number, the size limit. The sync
    ``send`` methods of ``Publisher`` and ``Pusher`` inline ``_encode``; keep them in step."""

    _kind: wire.Kind
    _prefix: bytes
    _pack: Callable[[Any], bytes]
    _seq: int
    _limit: int

    def _init_encoder(self, kind: wire.Kind, limit: int) -> None:
        self._kind = kind
        self._prefix = wire.HEADER_PREFIX[kind]
        self._pack = msgpack.Packer().pack
        self._seq = 0
        self._limit = limit

    def _encode(self, body: Any) -> tuple[list[Any], bool]:
        """(header + body frames, copy flag). Large bytes bodies go raw and uncopied.
        Raises LocalProtocolError for a body msgpack cannot encode, MessageTooLargeError for
        one over the limit."""
        if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
            return [self._raw_header(body), body], False
        try:
            data = self._pack(body)
        except wire.PACK_ERRORS as exc:
            raise wire.unencodable(exc) from exc
        self._seq += 1
        if len(data) > self._limit:
            raise MessageTooLargeError(len(data), self._limit)
        return [pack_canonical(self._prefix, self._seq, FLOAT64, time.time()), data], True

    def _raw_header(self, body: bytes | bytearray | memoryview) -> bytes:
        """The header of a raw body (sent as it is, without a copy). Raises
        MessageTooLargeError for one over the limit."""
        size = nbytes(body)
        if size > self._limit:
            raise MessageTooLargeError(size, self._limit)
        self._seq += 1
        return wire.pack_header(self._kind, self._seq, time.time(), wire.RAW_HEADERS)
