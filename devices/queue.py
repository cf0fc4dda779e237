"""The queue: a request/reply load balancer with least-recently-used routing.

Clients call the service through the device (``request(service, via=<device node>)``); each
worker (any node serving the service) gets a request only when it is idle, so a slow worker never
collects a backlog the way round robin lets it. Choosing the worker is a decision per message, which
``zmq.proxy_steerable`` cannot make, so this device relays in a Python loop; frames are still never
copied or decoded (``copy=False``), and the same steering commands work.
"""

from __future__ import annotations

import collections
import logging
import time

import zmq

from zmqfabric.core import wire
from zmqfabric.core.records import EndpointKind

from .base import PAUSE, RESUME, STATISTICS, TERMINATE, Device, DeviceStats

log = logging.getLogger(__name__)
#: Requests the queue holds while every worker is busy; beyond it, clients get an error reply.
MAX_PENDING = 10_000


class Queue(Device):
    front_kind = EndpointKind.QUEUE
    relayed_kind = EndpointKind.REPLY
    front_type = zmq.ROUTER
    back_type = zmq.DEALER  # unused: one DEALER per worker instead (see _workers)
    label = "queue"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._workers: dict[str, zmq.Socket] = {}
        self._idle: collections.deque[str] = collections.deque()
        self._busy: dict[str, tuple[float, list[zmq.Frame]]] = {}
        self._pending: collections.deque[list[zmq.Frame]] = collections.deque()
        self._counts = [0] * 8
        self._poller = zmq.Poller()
        self._busy_timeout = self._rt.config.request_timeout_s

    def _live_stats(self) -> DeviceStats:
        return DeviceStats(*self._counts)

    def _connect(self, url: str, key: str | None) -> None:
        """Device thread: one DEALER per worker, so that each request goes to an idle one."""
        if url in self._workers:
            return
        sock = self._rt.sockets.socket(zmq.DEALER, sync=True)
        try:
            self._rt.sockets.connect(sock, url, key)
        except Exception as exc:  # a bad peer must not stop the device
            log.warning("queue %s: cannot reach worker %s: %s", self.name, url, exc)
            sock.close(0)
            return
        self._workers[url] = sock
        self._poller.register(sock, zmq.POLLIN)
        self._idle.append(url)
        self._urls.add(url)

    def _disconnect(self, url: str) -> None:
        if url in self._workers:
            self._drop_worker(url)
            self._urls.discard(url)

    def _drop_worker(self, url: str) -> None:
        sock = self._workers.pop(url)
        self._poller.unregister(sock)
        sock.close(0)
        if url in self._idle:
            self._idle.remove(url)
        held = self._busy.pop(url, None)
        if held is not None:
            self._pending.appendleft(held[1])  # at least once: another worker gets it

    def _relay(self) -> None:
        self._poller.register(self._inbox.fd, zmq.POLLIN)
        self._poller.register(self.control, zmq.POLLIN)
        self._poller.register(self.front, zmq.POLLIN)
        paused = False
        self._apply_ops()  # providers known before the thread started
        while True:
            events = self._inbox.poll(self._poller, 250)
            if self.control in events:
                command = self.control.recv()
                # Same protocol as zmq.proxy_steerable: counters for STATISTICS, else empty.
                if command == STATISTICS:
                    self.control.send_multipart(self._live_stats().to_frames())
                else:
                    self.control.send(b"")
                if command == TERMINATE:
                    return
                if command == PAUSE and not paused:
                    paused = True
                    self._poller.unregister(self.front)  # requests wait unpolled: no busy loop
                elif command == RESUME and paused:
                    paused = False
                    self._poller.register(self.front, zmq.POLLIN)
            self._apply_ops()  # back-end changes posted by discovery (they woke the poll)
            for url, sock in list(self._workers.items()):
                if sock in events:
                    self._from_worker(url, sock)
            if not paused:
                self._expire_busy()
                self._dispatch()
                if self.front in events:
                    self._from_clients()

    def _from_clients(self) -> None:
        for _ in range(256):
            try:
                frames = self.front.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._count(0, frames)
            if len(frames) < 3 or frames[1].bytes:
                self._rt.counters.add("queue_refused_requests")  # not [client, "", ...]
                continue
            if len(self._pending) >= MAX_PENDING:
                self._reply_error(frames, "queue full: every worker is busy")
                continue
            self._pending.append(frames)
            self._dispatch()

    def _dispatch(self) -> None:
        while self._pending and self._idle:
            url = self._idle.popleft()
            frames = self._pending.popleft()
            self._busy[url] = (time.monotonic(), frames)
            self._workers[url].send_multipart(frames, copy=False)
            self._count(6, frames)

    def _from_worker(self, url: str, sock: zmq.Socket) -> None:
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._count(4, frames)
            if url in self._busy:
                del self._busy[url]
                self._idle.append(url)
            try:
                self.front.send_multipart(frames, zmq.NOBLOCK, copy=False)
                self._count(2, frames)
            except zmq.ZMQError:  # the client is gone
                self._rt.counters.add("queue_replies_undeliverable")

    def _expire_busy(self) -> None:
        """A worker that has not answered in the request timeout is idle again (its client has
        given up or retried by now)."""
        if not self._busy:
            return
        limit = time.monotonic() - self._busy_timeout
        for url, (since, _) in list(self._busy.items()):
            if since < limit:
                del self._busy[url]
                self._idle.append(url)
                self._rt.counters.add("queue_requests_expired")

    def _reply_error(self, frames: list[zmq.Frame], text: str) -> None:
        route = [f.bytes for f in frames[:2]]
        msg_id = (wire.request_id(frames[2].bytes) if len(frames) > 2 else None) or 0
        header = wire.pack_header(wire.Kind.ERROR, msg_id, time.time())  # matchable by its caller
        body = wire.pack_body({"type": "Overloaded", "message": text})
        try:
            self.front.send_multipart(route + [header, body], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _count(self, index: int, frames: list[zmq.Frame]) -> None:
        self._counts[index] += len(frames)
        self._counts[index + 1] += sum(len(f.buffer) for f in frames)

    def stop(self) -> None:
        super().stop()
        for url in list(self._workers):
            self._drop_worker(url)
