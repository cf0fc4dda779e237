"""Reliable tasks, the producer's connections to workers: one :class:`WorkerLink` (a DEALER and its
socket monitor) per worker of each task name, and :class:`Links`, which finds them by name and URL
or by socket and keeps the dispatcher's poller in step.

Owned by the dispatcher thread (:mod:`.producer`), which creates the sockets and decides what to
send; a link frames and sends it. Not thread-safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..constants import TASK_FRAME_OVERHEAD
from ..core import task_frames, wire
from ..core.tasktable import Task, TaskTable
from ..transport.frames import NOBLOCK, send_frames

_TASK = wire.Kind.TASK  # per message: a module global, not an enum class attribute


@dataclass(slots=True)
class WorkerLink:
    """Our connection to one worker of one task name."""

    name: str
    url: str
    sock: zmq.Socket
    monitor: zmq.Socket
    table: TaskTable
    hello_due: bool = False

    def events(self) -> Iterator[int]:
        """The socket events the monitor has queued (``zmq.EVENT_*``), without blocking."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            yield event["event"]

    def send_hello(self, hello: bytes) -> None:
        """Send our hello (credit request) now, or mark it due if the pipe is not attached."""
        header = wire.pack_header(wire.Kind.CREDIT, 0, time.time())
        try:
            self.sock.send_multipart([b"", header, hello], zmq.NOBLOCK)
            self.hello_due = False
        except zmq.ZMQError:
            self.hello_due = True  # the pipe is not attached yet: try again next round

    def send_tasks(self, tasks: list[Task], limit: int) -> int:
        """Send ``tasks`` in messages of at most ``limit`` bytes (what workers accept), without
        waiting; return how many left (the rest could not be queued)."""
        start, size = 0, 0
        for end, task in enumerate(tasks):
            one = len(task.payload) + TASK_FRAME_OVERHEAD
            if task.key is not None:
                one += 4 * len(task.key)  # UTF-8, at most 4 bytes a character
            size += one
            if size > limit and end > start:
                if not self._send_batch(tasks[start:end]):
                    return start
                start, size = end, one
        return len(tasks) if self._send_batch(tasks[start:]) else start

    def _send_batch(self, tasks: list[Task]) -> bool:
        body = task_frames.pack_task_records(tasks)
        header = wire.pack_header(_TASK, 0, time.time())
        try:
            send_frames(self.sock, [b"", header, body], NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close(0)


class Links:
    """Every open link, by (task name, worker URL), by socket and by monitor socket. ``add`` and
    ``remove`` register the link's two sockets with ``poller`` and unregister them."""

    def __init__(self, poller: zmq.Poller) -> None:
        self._poller = poller
        self._by_key: dict[tuple[str, str], WorkerLink] = {}
        self._by_sock: dict[Any, WorkerLink] = {}
        self._by_monitor: dict[Any, WorkerLink] = {}

    def get(self, name: str, url: str) -> WorkerLink | None:
        return self._by_key.get((name, url))

    def with_socket(self, sock: Any) -> WorkerLink | None:
        """The link whose DEALER is ``sock``."""
        return self._by_sock.get(sock)

    def with_monitor(self, sock: Any) -> WorkerLink | None:
        """The link whose monitor socket is ``sock``."""
        return self._by_monitor.get(sock)

    def __iter__(self) -> Iterator[WorkerLink]:
        return iter(self._by_key.values())

    def add(self, link: WorkerLink) -> None:
        self._by_key[(link.name, link.url)] = link
        self._by_sock[link.sock] = link
        self._by_monitor[link.monitor] = link
        self._poller.register(link.sock, zmq.POLLIN)
        self._poller.register(link.monitor, zmq.POLLIN)

    def remove(self, link: WorkerLink) -> None:
        """Forget the link and close it."""
        del self._by_key[(link.name, link.url)]
        del self._by_sock[link.sock]
        del self._by_monitor[link.monitor]
        self._poller.unregister(link.sock)
        self._poller.unregister(link.monitor)
        link.close()

    def close(self) -> None:
        """Close every link (the poller is not used any more)."""
        for link in self._by_key.values():
            link.close()
        self._by_key.clear()
        self._by_sock.clear()
        self._by_monitor.clear()
