"""The two drivers of a :class:`~zmqfabric.patterns.handlers.Served` endpoint: a thread of its
own (sync node) and a task of the loop (asyncio node). Both do the same, only waiting differs:

1. receive a message while fewer than ``concurrency`` jobs wait for a slot (beyond that, requests
   stay queued in ZeroMQ, bounded by its high-water mark), and ``accept`` it into jobs;
2. hand each job to a slot, in order: inline (sync node, ``concurrency=1``, a plain function:
   the owner calls the handler itself; the hot path), a :class:`ThreadSlots` pool (plain
   functions otherwise), or coroutines of the loop (coroutine functions on an asyncio node);
3. take each outcome in the owner (``done``) and ``flush`` what is batched once the outcomes
   that arrived together are in;
4. on a FATAL outcome (a handler raised SystemExit...), stop taking jobs and call ``on_fatal``;
5. on ``stop``, drop the jobs not started, let the running ones finish for at most
   THREAD_JOIN_TIMEOUT_S (their outcomes are still sent), then end.

An inline driver (``concurrency=1`` on a sync node) blocks in its socket's receive, as a raw REP
socket does, and ``stop`` wakes it through the socket itself (see ``_serve_inline``); a driver
with slots polls the socket and its inbox, where the slots post outcomes.

A driver owns its endpoint's socket while it runs; the node starts drivers in ``run()`` and
stops them before ``run()`` returns, so that the socket is handed back to the node (which closes
it) only by a thread that has ended. A driver whose handler never returns is left behind (its
threads are daemons) and reported.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, cast

import zmq

from ..constants import POLL_INTERVAL_MS, THREAD_JOIN_TIMEOUT_S
from ..transport.frames import NOBLOCK, SocketWaker, recv_frames
from ..transport.inbox import Inbox
from ..transport.readable import Receiver
from ..transport.sockets import sync_view
from .handlers import FATAL, Job, Served, Status, ThreadSlots, acall, call, is_coroutine_handler

#: ``getsockopt`` as the C method, its arguments as plain ints (hot path).
_GET = cast("Callable[[Any, int], int]", zmq.backend.Socket.get)
#: The C-level receive (a routing id as bytes).
_RECV = zmq.backend.Socket.recv
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

log = logging.getLogger(__name__)
#: Messages served from the socket before the driver looks at its inbox (fairness).
_BATCH = 64
#: An idle driver wakes this often (ms) even if nobody posts (stop is posted; a safety net).
_IDLE_MS = POLL_INTERVAL_MS * 5
#: An idle slot thread ends within this (s) of the stop (it only has to wake up and return).
_END_S = 1.0
OnFatal = Callable[[BaseException], None]


class ThreadDriver:
    """Serves one endpoint of a sync node in a thread of its own, which owns the socket.

    ``start``/``stop``/``join`` belong to the node's ``run()`` thread; ``stop`` is thread-safe.
    ``on_fatal(exc)`` is called in the driver's thread."""

    def __init__(self, ep: Served, node_name: str, on_fatal: OnFatal) -> None:
        self._ep = ep
        self._on_fatal = on_fatal
        self._inbox = Inbox()
        self._stopping = False
        label = f"zmqfabric-{ep.noun.replace(' ', '-')}-{node_name}-{ep.name}"
        self._pool = (None if ep.concurrency == 1
                      else ThreadSlots(ep, self._deliver_from_slot, label))
        # A daemon only because an inline handler that never returns must not keep the process
        # alive; stop() and join() are the shutdown plan.
        self._thread = threading.Thread(target=self._run, name=label, daemon=True)
        #: Wakes an inline driver (no pool) blocked in its socket's receive.
        self._waker: SocketWaker | None = None

    def start(self) -> None:
        self._inbox.open()
        if self._pool is not None:
            self._pool.start()
        else:
            self._waker = SocketWaker(self._ep.socket)
        try:
            self._thread.start()
        except BaseException:
            if self._waker is not None:
                self._waker.close()  # its socket would keep the context from terminating
            raise

    def stop(self) -> None:
        """Ask the driver to end (see the module docstring). Thread-safe; idempotent."""
        self._inbox.post(self._halt)
        if self._waker is not None:
            self._waker.wake()  # an inline driver blocks in the socket's receive, not a poll

    def join(self, deadline: float) -> bool:
        """Wait for the driver's thread, at most until ``deadline`` (monotonic); False, logged,
        if a handler still runs then (the thread is left behind)."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        ended = not self._thread.is_alive()
        if self._waker is not None:
            self._waker.close(unbind=ended)
        if not ended:
            log.error("%s %s: a handler did not return within %s s of the stop; left running",
                      self._ep.noun, self._ep.name, THREAD_JOIN_TIMEOUT_S)
            return False
        self._inbox.close()
        return True

    # --- the driver's thread ------------------------------------------------------------------

    def _halt(self) -> None:
        self._stopping = True

    def _deliver_from_slot(self, job: Job, status: Status, value: Any) -> None:
        self._inbox.post(self._deliver, job, status, value)  # a slot's thread: hand it over

    def _deliver(self, job: Job, status: Status, value: Any) -> None:
        self._ep.done(job, status, value)
        if status is FATAL:
            self._fatal(value)

    def _fatal(self, exc: BaseException) -> None:
        self._stopping = True
        self._on_fatal(exc)

    def _run(self) -> None:
        ep = self._ep
        try:
            if self._pool is None:
                self._serve_inline()
            else:
                self._serve()
            self._drain()
        except zmq.ZMQError as exc:  # the socket was closed under a driver left behind
            log.debug("%s %s: driver ended: %s", ep.noun, ep.name, exc)
        except BaseException as exc:  # a bug here must not go unnoticed
            log.exception("%s %s: the driver failed", ep.noun, ep.name)
            self._on_fatal(exc)

    def _serve_inline(self) -> None:
        """Concurrency 1, the hot path: block in the socket's receive itself, as a raw REP
        socket does (a poll of the socket and the inbox pipe, then a receive, cost a system
        call or two per message); ``stop`` wakes it through the socket (:class:`SocketWaker`),
        and the inbox is looked at after every message, once it is served. An idle driver wakes
        every _IDLE_MS.
        An endpoint that holds outcomes (``flushes``) flushes them once no message waits."""
        ep, inbox = self._ep, self._inbox
        sock = ep.socket
        assert self._waker is not None
        token = self._waker.token
        flushes = ep.flushes
        #: An endpoint's own hot path for a message it serves whole (optional; see Served): an
        #: endpoint that flushes names it ``serve_batch`` (a task endpoint: a batch of tasks,
        #: outcomes held for ``flush`` as ``done`` holds them), one that does not ``serve_one``.
        serve_one: Callable[[list[bytes]], tuple[Status, Any] | None] | None = getattr(
            ep, "serve_batch" if flushes else "serve_one", None)
        sock.setsockopt(zmq.RCVTIMEO, _IDLE_MS)
        held = 0
        while not self._stopping:
            try:
                route = _RECV(sock, 0)  # a Served socket is a ROUTER: recv_routed inlined
            except zmq.Again:  # idle
                frames = None
            else:
                frames = recv_frames(sock, NOBLOCK)
                if frames:
                    frames.insert(0, route)
            if frames is None or (len(frames) == 2 and frames[1] == token):
                ep.flush()
            elif serve_one is not None and (done := serve_one(frames)) is not None:
                if done[0] is FATAL:  # served whole by the endpoint's hot path
                    self._fatal(done[1])
                    return
                if flushes:
                    held += 1
                    if held >= _BATCH or not _GET(sock, _EVENTS) & _POLLIN:
                        held = 0
                        ep.flush()
            else:
                # Served even if a stop came meanwhile: taken off the socket, it would be lost
                # (run() in a loop restarts its drivers); one not yet read waits in the socket.
                for job in ep.accept(frames):
                    status, value = call(ep, job, 0)
                    ep.done(job, status, value)
                    if status is FATAL:
                        self._fatal(value)
                        return  # the rest of a task batch is not acknowledged: goes elsewhere
                if flushes:
                    held += 1
                    # Outcomes of messages that arrived together leave together (<= _BATCH).
                    if held >= _BATCH or not _GET(sock, _EVENTS) & _POLLIN:
                        held = 0
                        ep.flush()
            if inbox.pending:
                inbox.run_pending()

    def _serve(self) -> None:
        """Concurrency > 1: poll the socket (while a slot is free) and the inbox, where the
        slots post their outcomes."""
        ep, inbox, pool = self._ep, self._inbox, self._pool
        assert pool is not None
        sock = ep.socket
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(inbox.fd, zmq.POLLIN)
        reading = True
        while not self._stopping:
            events = inbox.poll(poller, _IDLE_MS)
            if inbox.pending:
                inbox.run_pending()
            if reading and sock in events and not self._stopping:
                self._read_into(sock, pool)
            ep.flush()
            if reading != (pool.waiting < ep.concurrency):
                reading = not reading  # full: requests wait in ZeroMQ's queue until a slot frees
                poller.modify(sock, zmq.POLLIN if reading else 0)

    def _read_into(self, sock: zmq.Socket[Any], pool: ThreadSlots) -> None:
        ep = self._ep
        limit = ep.concurrency
        for _ in range(_BATCH):
            if pool.waiting >= limit:
                return
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            for job in ep.accept(frames):
                pool.submit(job)

    def _drain(self) -> None:
        """After a stop: drop the jobs not started, send the outcomes of the running ones."""
        pool, inbox, ep = self._pool, self._inbox, self._ep
        if pool is not None:
            pool.stop()
            deadline = time.monotonic() + THREAD_JOIN_TIMEOUT_S
            poller = zmq.Poller()
            poller.register(inbox.fd, zmq.POLLIN)
            while ep.slots.busy() and (left := deadline - time.monotonic()) > 0:
                inbox.poll(poller, max(1, int(left * 1000)))
                inbox.run_pending()
            joined = pool.join(deadline)  # a slot posts its outcome before it ends
            inbox.run_pending()
            if not joined:
                log.error("%s %s: %d handler(s) did not return within %s s of the stop; left "
                          "running", ep.noun, ep.name, ep.slots.busy(), THREAD_JOIN_TIMEOUT_S)
        ep.flush()


class LoopDriver:
    """Serves one endpoint of an asyncio node in the loop that owns the socket.

    ``start``, ``stop`` and ``on_fatal(exc)`` run in the loop."""

    def __init__(self, ep: Served, node_name: str, on_fatal: OnFatal) -> None:
        self._ep = ep
        self._on_fatal = on_fatal
        self._loop = asyncio.get_running_loop()
        self._coroutines = is_coroutine_handler(ep.handler)
        self._queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=ep.concurrency)
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._flush_soon = False
        self._stopping = False
        self._pool = (None if self._coroutines else ThreadSlots(
            ep, self._deliver_from_slot, f"zmqfabric-{ep.noun.replace(' ', '-')}-{node_name}-"
            f"{ep.name}"))
        self._tasks: list[asyncio.Task[None]] = []
        #: The receive loop's Receiver (a ROUTER socket), while it runs.
        self._receiver: Receiver | None = None

    def start(self) -> None:
        if self._pool is not None:
            self._pool.start()
        else:
            self._tasks = [asyncio.create_task(self._work(slot))
                           for slot in range(self._ep.concurrency)]
        self._tasks.append(asyncio.create_task(self._receive()))

    async def stop(self) -> None:
        """Stop receiving, drop the jobs not started, wait (bounded) for the running ones and
        send their outcomes; coroutine handlers still running then are cancelled."""
        self._stopping = True
        receiver = self._tasks.pop()
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
        while not self._queue.empty():
            self._queue.get_nowait()
        if self._pool is not None:
            self._pool.stop()
        deadline = time.monotonic() + THREAD_JOIN_TIMEOUT_S
        while self._ep.slots.busy() and (left := deadline - time.monotonic()) > 0:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), left)
            except asyncio.TimeoutError:
                break
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pool is not None:
            # Idle slot threads end at once; a hung one is left behind without waiting more.
            joined = not self._ep.slots.busy() and await asyncio.to_thread(
                self._pool.join, time.monotonic() + _END_S)
            await asyncio.sleep(0)  # the outcomes the slots posted before they ended
            if not joined:
                log.error("%s %s: %d handler(s) did not return within %s s of the stop; left "
                          "running", self._ep.noun, self._ep.name, self._ep.slots.busy(),
                          THREAD_JOIN_TIMEOUT_S)
        self._ep.flush()

    async def _receive(self) -> None:
        ep, queue, pool = self._ep, self._queue, self._pool
        sock = ep.socket
        rest = sync_view(sock)
        # A ROUTER's routing id is always followed by the peer's frames.
        routed = rest.get(zmq.TYPE) == zmq.ROUTER
        limit = ep.concurrency
        # The routing id awaited on the socket's descriptor (pyzmq's asyncio receive costs
        # several get(EVENTS) a message), the rest, there with it, read at once: recv_multipart
        # asks the socket for RCVMORE after every frame, a slow call in pyzmq.
        receiver = self._receiver = Receiver(rest, self._loop) if routed else None
        try:
            while True:
                if pool is not None:
                    while pool.waiting >= limit:
                        self._room.clear()
                        await self._room.wait()
                if receiver is not None:
                    route = cast(bytes, await receiver.recv())  # no deadline: never None
                    frames = recv_frames(rest, NOBLOCK)
                    if frames:
                        frames.insert(0, route)
                else:
                    frames = await sock.recv_multipart()
                for job in ep.accept(frames):
                    if pool is not None:
                        pool.submit(job)
                    else:
                        await queue.put(job)  # waits while `concurrency` jobs wait for a slot
                if self._stopping:
                    return
        finally:
            if receiver is not None:
                self._receiver = None
                receiver.close()

    async def _work(self, slot: int) -> None:
        queue, ep = self._queue, self._ep
        while True:
            job = await queue.get()
            if self._stopping:
                continue  # after a FATAL outcome: not started, so it goes elsewhere
            status, value = await acall(ep, job, slot)
            self._deliver(job, status, value)

    def _deliver_from_slot(self, job: Job, status: Status, value: Any) -> None:
        self._loop.call_soon_threadsafe(self._deliver, job, status, value)  # raises once closed

    def _deliver(self, job: Job, status: Status, value: Any) -> None:
        ep = self._ep
        ep.done(job, status, value)
        if self._receiver is not None:
            self._receiver.check()  # the reply's send may have taken a request's wake-up
        self._room.set()
        if not ep.slots.busy():
            self._idle.set()
        if not self._flush_soon:  # once the outcomes that arrived together are in
            self._flush_soon = True
            self._loop.call_soon(self._flush)
        if status is FATAL and not self._stopping:
            self._stopping = True
            self._on_fatal(value)

    def _flush(self) -> None:
        self._flush_soon = False
        self._ep.flush()
        if self._receiver is not None:
            self._receiver.check()
