"""The rest of a batch a receiver has taken from its socket: a pipeline's or a stream's
receives return its messages one by one (docs/PROTOCOL.md, "Batches"). Owned by the receiver's
thread."""

from __future__ import annotations

import collections
from typing import Any

from ..core import wire


class Pending:
    """Bodies of a batch not yet delivered, and what their messages share (kind, timestamp,
    topic, header map); each message's id is the batch's first id plus its place in it.
    Falsy when empty."""

    __slots__ = ("_bodies", "bodies", "_end_id", "_kind", "_timestamp", "_topic", "_headers")

    def __init__(self) -> None:
        self._bodies: collections.deque[Any] = collections.deque()
        #: The same deque, for hot paths to test without a Python ``__len__`` call (read it
        #: only: empty means no message is pending).
        self.bodies = self._bodies
        self._end_id = 0
        self._kind = wire.Kind.MESSAGE
        self._timestamp = 0.0
        self._topic: str | None = None
        self._headers: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self._bodies)

    def clear(self) -> None:
        """Drop every pending body."""
        self._bodies.clear()

    def popleft(self) -> Any:
        """The next body. Raises IndexError when none is left."""
        return self._bodies.popleft()

    def pop_event(self) -> tuple[str, Any]:
        """The next ``(topic, body)`` of a stream's batch, without building its Message (a
        subscription's ``recv``). Raises IndexError when none is left."""
        return self._topic or "", self._bodies.popleft()

    def next(self) -> wire.Message:
        """The next message. Raises IndexError when none is left."""
        msg_id = (self._end_id - len(self._bodies) + 1) & wire.MAX_ID
        return wire.Message(self._kind, msg_id, self._timestamp, self._bodies.popleft(),
                            self._topic, self._headers)

    def take(self, fields: list[Any], topic: str | None = None) -> Any:
        """The first body of a canonical batch decoded as ``fields`` (``[2, kind | 32, id,
        timestamp, bodies]``, bodies not empty); the others are kept."""
        bodies = fields[4]
        if len(bodies) > 1:
            self._keep(wire.Kind(fields[1] ^ wire.BATCH), fields[2], fields[3], bodies, topic,
                       None)
        return bodies[0]

    def first(
        self, header: wire.Header, body: Any, topic: str | None = None
    ) -> wire.Message | None:
        """The message of a decoded message; of a batch, its first (None for an empty batch),
        the others kept."""
        if not header.batch:
            return wire.Message(header.kind, header.msg_id, header.timestamp, body, topic,
                                header.headers)
        if not body:
            return None
        if len(body) > 1:
            self._keep(header.kind, header.msg_id, header.timestamp, body, topic,
                       header.headers)
        return wire.Message(header.kind, header.msg_id, header.timestamp, body[0], topic,
                            header.headers)

    def _keep(self, kind: wire.Kind, first: int, timestamp: float, bodies: list[Any],
              topic: str | None, headers: dict[str, Any] | None) -> None:
        self._bodies.extend(bodies[1:])
        self._end_id = first + len(bodies) - 1
        self._kind, self._timestamp, self._topic, self._headers = kind, timestamp, topic, headers
