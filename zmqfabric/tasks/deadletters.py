"""Dead letters: tasks that failed their last attempt. Each one is published on the stream
``<task name>.dead`` (topic: the error type) by the producer node, appended to a JSON-lines file
when one is configured, and logged.

A dead letter is ``{"id", "name", "key", "attempts", "deliveries", "error": {"type",
"message"}, "node", "time", "body"}``: ``attempts`` are the deliveries charged (they may have
run), ``deliveries`` every delivery. In the file, bytes inside the body become
``{"$bytes": base64}``, and a body JSON cannot hold at all becomes ``{"$msgpack": base64 of the
encoded body}``. The file holds payloads: it is created 0600 whatever the umask, and a
symbolic link, a non-regular file or another user's file at its path is refused (logged, and
the letter still goes to the stream and the log).

Owned by the dispatcher thread (the publishers are its sockets). An observer node
(``advertise=False``) cannot publish: its dead letters go to the file and the log only.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ..core import wire
from ..core.tasktable import Task
from ..errors import FabricError, MessageTooLargeError, RemoteProtocolError, TaskFailedError
from ..patterns.pubsub import Publisher
from ..stats import RateLimitedLog
from .files import open_private

if TYPE_CHECKING:
    from ..runtime import NodeRuntime

log = logging.getLogger(__name__)
_rlog = RateLimitedLog(log)
SUFFIX = ".dead"


class DeadLetters:
    def __init__(self, node: NodeRuntime, path: str | None) -> None:
        self._node = node
        self.path = path
        self._publishers: dict[str, Publisher | None] = {}

    def open(self, name: str) -> None:
        """Publish the dead-letter stream of task ``name`` from now on (so that subscribers can
        connect before the first dead letter)."""
        if name in self._publishers:
            return
        publisher = None
        if self._node.advertised:
            try:
                publisher = Publisher(self._node, name + SUFFIX)
            except FabricError as exc:
                log.warning("%s: no dead-letter stream for task %r: %s", self._node.name, name, exc)
        self._publishers[name] = publisher

    def send(self, name: str, task: Task, failure: TaskFailedError) -> None:
        log.warning("%s: %s", self._node.name, failure)
        try:
            body = wire.unpack_body(task.payload)
        except RemoteProtocolError:
            body = None
        record = {
            "id": task.id, "name": name, "key": task.key, "attempts": task.charged,
            "deliveries": task.attempts,
            "error": {"type": failure.error_type, "message": failure.error},
            "node": self._node.name, "time": time.time(), "body": body,
        }
        publisher = self._publishers.get(name)
        if publisher is not None:
            try:
                try:
                    publisher.send(failure.error_type, record)
                except MessageTooLargeError:  # the file keeps the body; the stream says its size
                    publisher.send(failure.error_type,
                                   {**record, "body": None, "body_bytes": len(task.payload)})
            except FabricError as exc:
                log.warning("%s: cannot publish dead letter %s: %s", self._node.name, task.id, exc)
        if self.path is not None:
            try:
                fd = open_private(self.path, os.O_WRONLY | os.O_APPEND)
                try:
                    line = json_line(record, task.payload).encode()
                    while line:  # a regular file takes it all, barring a full disk
                        line = line[os.write(fd, line):]
                finally:
                    os.close(fd)
            except OSError as exc:
                self._node.counters.add("dead_letters_unwritten")
                _rlog.warning("dead-letters", "%s: cannot write dead letter to %s: %s",
                              self._node.name, self.path, exc)

    def close(self) -> None:
        for publisher in self._publishers.values():
            if publisher is not None:
                publisher.close()
        self._publishers.clear()


def json_line(record: dict[str, Any], payload: bytes) -> str:
    """One line of the dead-letter file."""
    try:
        return json.dumps(record, default=_bytes_to_json) + "\n"
    except (TypeError, ValueError):  # a body JSON cannot hold (e.g. a map with bytes keys)
        record = dict(record, body={"$msgpack": base64.b64encode(payload).decode()})
        return json.dumps(record, default=_bytes_to_json) + "\n"


def _bytes_to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    raise TypeError(f"{type(value).__name__} is not JSON")
