"""What the senders of a stream (``Publisher``) and of a pipeline (``Pusher``, ``AsyncPusher``)
share to frame a message: pre-packed prefixes, one msgpack Packer per handle, a sequence number
and the size limit, in the layout of :mod:`zmqfabric.core.wire` (version 2: one frame per
message, a batch of messages per frame for ``send_many``).

The size limit is the node's ``max_message_size``, which every receiver enforces with ZeroMQ's
MAXMSGSIZE (per frame): a peer that receives a larger frame drops the connection. So senders check
the frame's length against it (less the envelope: the fixed fields and a topic are bounded far
below it) and raise :class:`~zmqfabric.errors.MessageTooLargeError` before anything is sent."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

import msgpack

from ..constants import DECODE_CHECK_SIZE, MAX_BATCH, ZERO_COPY_THRESHOLD
from ..core import wire
from ..core.wire import FLOAT64, pack_canonical
from ..errors import MessageTooLargeError

#: A batch frame's bytes besides its bodies: the fixed fields (21), the array header (3), and
#: a topic (1025 at most) and its end.
_BATCH_ENVELOPE = 21 + 3 + 1026
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
        self._prefix = wire.MESSAGE_PREFIX[kind]
        self._batch_prefix = wire.BATCH_PREFIX[kind]
        packer = msgpack.Packer()
        self._pack = packer.pack
        self._array_header = packer.pack_array_header
        self._seq = 0
        self._limit = limit

    def _encode(self, body: Any) -> tuple[list[Any], bool]:
        """(the message's frames, copy flag): one frame; large bytes bodies as a header frame
        and the body raw and uncopied. Raises LocalProtocolError for a body msgpack cannot
        encode, MessageTooLargeError for one over the limit."""
        if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
            return [self._raw_header(body), body], False
        try:
            data = self._pack(body)
        except wire.PACK_ERRORS as exc:
            raise wire.unencodable(exc) from exc
        self._seq += 1
        if len(data) > self._limit:
            raise MessageTooLargeError(len(data), self._limit)
        return [pack_canonical(self._prefix, self._seq, FLOAT64, time.time()) + data], True

    def _batches(self, bodies: Iterable[Any]) -> Iterator[tuple[list[Any], bool]]:
        """The frames of ``bodies`` as :meth:`_encode` gives them, but up to MAX_BATCH bodies
        packed together in one batch frame while the frame stays under the limit; large bytes
        bodies travel alone, raw. Every body is encoded before the first batch is yielded, so an
        unencodable body or one over the limit (LocalProtocolError, MessageTooLargeError)
        sends nothing. A batch stays under DECODE_CHECK_SIZE, which its receiver then decodes
        without the expansion check (a larger body travels alone)."""
        pack, limit = self._pack, self._limit
        room = min(limit, DECODE_CHECK_SIZE - _BATCH_ENVELOPE)
        items: list[Any] = []
        for body in bodies:
            if isinstance(body, BINARY) and len(body) >= ZERO_COPY_THRESHOLD:
                if nbytes(body) > limit:
                    raise MessageTooLargeError(nbytes(body), limit)
                items.append((body,))
                continue
            try:
                data = pack(body)
            except wire.PACK_ERRORS as exc:
                raise wire.unencodable(exc) from exc
            if len(data) > limit:
                raise MessageTooLargeError(len(data), limit)
            items.append(data)
        run: list[bytes] = []
        size = 0
        for item in items:
            if type(item) is tuple or len(run) >= MAX_BATCH or size + len(item) > room:
                if run:
                    yield self._batch(run), True
                run, size = [], 0
            if type(item) is tuple:
                yield [self._raw_header(item[0]), item[0]], False
            else:
                run.append(item)
                size += len(item)
        if run:
            yield self._batch(run), True

    def _batch(self, packed: list[bytes]) -> list[Any]:
        """One frame holding the packed bodies: a single message as itself, more as a batch."""
        first = self._seq + 1
        self._seq += len(packed)
        if len(packed) == 1:
            return [pack_canonical(self._prefix, first, FLOAT64, time.time()) + packed[0]]
        return [b"".join((pack_canonical(self._batch_prefix, first, FLOAT64, time.time()),
                          self._array_header(len(packed)), *packed))]

    def _raw_header(self, body: bytes | bytearray | memoryview) -> bytes:
        """The header of a raw body (sent as it is, without a copy). Raises
        MessageTooLargeError for one over the limit."""
        size = nbytes(body)
        if size > self._limit:
            raise MessageTooLargeError(size, self._limit)
        self._seq += 1
        return wire.pack_header(self._kind, self._seq, time.time(), wire.RAW_HEADERS)
