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
        self._raw_prefix = wire.RAW_PREFIX[kind]
        packer = msgpack.Packer()
        self._pack = packer.pack
        self._array_header = packer.pack_array_header
        self._seq = 0
        self._limit = limit
        #: Bytes of packed bodies (with their array's header) one batch frame carries at most.
        self._room = min(limit, DECODE_CHECK_SIZE - _BATCH_ENVELOPE)
        #: Bodies the next batch run packs at once (MAX_BATCH, less while they pack too big).
        self._run_length = MAX_BATCH

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
        without the expansion check (a larger body travels alone).

        The hot path packs each run of MAX_BATCH bodies with one msgpack call (the array and its
        bodies: the batch's fifth item as it goes on the wire); a run that does not fit one
        frame, or that msgpack refuses, is packed body by body (:meth:`_split`)."""
        if type(bodies) is not list:
            bodies = list(bodies)
        taken = self._seq
        try:
            frames = self._runs(bodies)
        except BaseException:
            self._seq = taken  # nothing is sent: no sequence number is taken
            raise
        return iter(frames)

    def _runs(self, bodies: list[Any]) -> list[tuple[list[Any], bool]]:
        """:meth:`_batches`'s frames as a list; raises as it does, after taking sequence numbers
        (the caller puts them back). A run is packed with one msgpack call; one that comes out
        over the room is cut to the share that fits (the length is remembered for the next
        runs: bodies of a kind pack to similar sizes) and packed again."""
        pack, room = self._pack, self._room
        frames: list[tuple[list[Any], bool]] = []
        total, at = len(bodies), 0
        while at < total:
            length = self._run_length
            run = bodies if at == 0 and total <= length else bodies[at:at + length]
            if len(run) < 2:
                frames.extend(self._split(run))
                at += len(run)
                continue
            try:
                data = pack(run)
            except wire.PACK_ERRORS:
                frames.extend(self._split(bodies[at:]))  # says which body, and raises
                break
            if len(data) > room:
                fits = len(run) * room // len(data)
                if fits < 2:  # a large body among them: body by body
                    frames.extend(self._split(run))
                    at += len(run)
                else:
                    self._run_length = fits
                continue
            first = self._seq + 1
            self._seq += len(run)
            frames.append(([pack_canonical(self._batch_prefix, first, FLOAT64, time.time())
                            + data], True))
            at += len(run)
            if len(run) == length < MAX_BATCH and 2 * len(data) <= room:
                self._run_length = min(MAX_BATCH, 2 * length)  # smaller bodies now
        return frames

    def _batch(self, packed: list[bytes]) -> list[Any]:
        """One frame holding the packed bodies: a single message as itself, more as a batch."""
        first = self._seq + 1
        self._seq += len(packed)
        if len(packed) == 1:
            return [pack_canonical(self._prefix, first, FLOAT64, time.time()) + packed[0]]
        return [b"".join((pack_canonical(self._batch_prefix, first, FLOAT64, time.time()),
                          self._array_header(len(packed)), *packed))]

    def _split(self, bodies: list[Any]) -> list[tuple[list[Any], bool]]:
        """The frames of ``bodies`` packed body by body: batches that stay under the room
        (one body: a message of its own), large bytes bodies alone and raw. Raises as
        :meth:`_batches`, before taking any sequence number."""
        pack, limit, room = self._pack, self._limit, self._room
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
        frames: list[tuple[list[Any], bool]] = []
        run: list[bytes] = []
        size = 0
        for item in items:
            if type(item) is tuple or len(run) >= MAX_BATCH or size + len(item) > room:
                if run:
                    frames.append((self._batch(run), True))
                run, size = [], 0
            if type(item) is tuple:
                frames.append(([self._raw_header(item[0]), item[0]], False))
            else:
                run.append(item)
                size += len(item)
        if run:
            frames.append((self._batch(run), True))
        return frames

    def _raw_header(self, body: bytes | bytearray | memoryview) -> bytes:
        """The header of a raw body (sent as it is, without a copy). Raises
        MessageTooLargeError for one over the limit."""
        size = nbytes(body)
        if size > self._limit:
            raise MessageTooLargeError(size, self._limit)
        self._seq += 1
        return pack_canonical(self._raw_prefix, self._seq, FLOAT64, time.time()) + wire.RAW_MAP
