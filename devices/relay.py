"""The forwarder (pub/sub hub) and the streamer (pipeline hub): ``zmq.proxy_steerable`` relays in C,
so frames never pass through Python.

The device thread runs the proxy only while there is something to relay: not while paused, and
(streamer) not while no puller is known, where libzmq 4.3.5's proxy busy-loops. Otherwise it
waits in Python on the control socket and a wake-up pipe. To pause, or to apply a change of the
back end's peers, the steering side stops the proxy without losing a count: it pauses it, reads
its counters, then ends it (TERMINATE); the thread applies the change and starts it again. While
idle, the thread sleeps on the control socket and its inbox's wake-up pipe.

libzmq's own PAUSE/RESUME are not used to pause the device: libzmq 4.3.5 swapped them, and other
versions do not answer them (libzmq PR #4600). :func:`proxy_steering` finds out which command
pauses this libzmq and whether it answers, once per process.
"""

from __future__ import annotations

import functools
import threading

import zmq

from zmqfabric.core.records import EndpointKind

from .base import (
    PAUSE,
    RESUME,
    STATISTICS,
    STEER_TIMEOUT_S,
    TERMINATE,
    Device,
    DeviceState,
    DeviceStats,
)

#: How long (ms) the probe waits for a reply or a relayed message on inproc (µs in practice).
_PROBE_MS = 100


@functools.cache
def proxy_steering() -> tuple[bytes, bool]:
    """(the command that pauses this libzmq's proxy, whether the proxy answers PAUSE, RESUME and
    TERMINATE). Found with a proxy on inproc sockets; takes up to 0.2 s, once per process."""
    ctx = zmq.Context()
    kinds = (zmq.PULL, zmq.PUSH, zmq.PAIR, zmq.PAIR, zmq.PUSH, zmq.PULL)
    front, back, control, steer, source, sink = socks = [ctx.socket(k) for k in kinds]
    try:
        for sock in socks:
            sock.setsockopt(zmq.LINGER, 0)
        front.bind("inproc://probe-front")
        source.connect("inproc://probe-front")
        back.bind("inproc://probe-back")
        sink.connect("inproc://probe-back")
        control.bind("inproc://probe-control")
        steer.connect("inproc://probe-control")
        thread = threading.Thread(target=zmq.proxy_steerable, args=(front, back, None, control),
                                  name="zmqfabric-proxy-probe")
        thread.start()
        steer.send(PAUSE)
        answers = bool(steer.poll(_PROBE_MS))
        if answers:
            steer.recv_multipart()
        source.send(b"probe")
        paused = not sink.poll(_PROBE_MS)
        steer.send(TERMINATE)
        thread.join(STEER_TIMEOUT_S)
    finally:
        for sock in socks:
            sock.close(0)
        ctx.term()
    return (PAUSE if paused else RESUME), answers


class ProxyDevice(Device):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        #: The device thread is in (or about to enter) the proxy. Changed under _state_lock, which
        #: is never held while waiting: the device thread takes only this one, so a steering call
        #: that holds _steer_lock while it waits for the thread's answer cannot block the thread.
        #: Order: _steer_lock, then _state_lock.
        self._in_proxy = False
        self._state_lock = threading.Lock()
        self._pause_command, self._answers = proxy_steering()

    def _relayable(self) -> bool:
        """Whether running the proxy makes sense now (the streamer needs a puller)."""
        return True

    # --- steering side (any thread) -------------------------------------------------------

    def pause(self) -> None:
        with self._steer_lock:
            if self.state is DeviceState.RUNNING:
                self.state = DeviceState.PAUSED
                self._leave_proxy_locked()

    def resume(self) -> None:
        with self._steer_lock:
            if self.state is DeviceState.PAUSED:
                self.state = DeviceState.RUNNING
                self._inbox.wake()

    def _interrupt(self) -> None:
        """Discovery changed the back end's peers: restart the proxy, or wake the idle thread."""
        with self._steer_lock:
            if self._stopping:
                return
            if not self._leave_proxy_locked():
                self._inbox.wake()  # the idle thread: the post woke it if it already slept

    def _leave_proxy_locked(self) -> bool:
        """Pause the proxy, carry its counters over and end it: no part goes uncounted. The proxy
        handles the three commands in order; their replies are read later (owed), so discovery's
        thread never waits here. False if the thread was not relaying."""
        with self._state_lock:
            if not self._in_proxy:
                return False
            self._send_owed_locked(self._pause_command, replies=self._answers)
            self._send_owed_locked(STATISTICS, carry=True)
            self._send_owed_locked(TERMINATE, replies=self._answers)
            self._in_proxy = False
            return True

    def _terminate(self) -> None:
        with self._steer_lock:
            self._leave_proxy_locked()
            self._steer.send(TERMINATE)  # for the idle loop (it does not answer)
        self._inbox.wake()

    # --- device thread ------------------------------------------------------------------------

    def _relay(self) -> None:
        while not self._stopping:
            self._apply_ops()
            with self._state_lock:
                if self._inbox.pending:
                    continue  # a change arrived meanwhile: apply it first
                self._in_proxy = (self.state is DeviceState.RUNNING and not self._stopping
                                  and self._relayable())
                run = self._in_proxy
            if run:
                zmq.proxy_steerable(self.front, self.back, None, self.control)
            elif not self._idle():
                return

    def _idle(self) -> bool:
        """Not relaying: answer the control socket until woken; False on TERMINATE."""
        inbox = self._inbox
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(inbox.fd, zmq.POLLIN)
        while True:
            events = inbox.poll(poller, None)
            if self.control in events:
                command = self.control.recv()
                if command == TERMINATE:
                    return False
                if command == STATISTICS:  # the counters live in _carried meanwhile
                    self.control.send_multipart(DeviceStats().to_frames())
                elif self._answers:
                    self.control.send(b"")
            if inbox.fd in events or inbox.pending:
                return True


class Forwarder(ProxyDevice):
    """Pub/sub hub for one stream: XSUB connects to every publisher of the stream, XPUB is the
    front end subscribers reach with ``subscribe(stream, via=<device node>)``. Subscriptions travel
    upstream, so publishers filter at the source."""

    front_kind = EndpointKind.FORWARDER
    relayed_kind = EndpointKind.STREAM
    front_type = zmq.XPUB
    back_type = zmq.XSUB
    label = "forwarder"


class Streamer(ProxyDevice):
    """Pipeline hub for one pipeline: producers push into the front end
    (``pusher(pipeline, via=<device node>)``), the back end deals to every puller found.
    Messages wait in the front end while no puller is known."""

    front_kind = EndpointKind.STREAMER
    relayed_kind = EndpointKind.PIPELINE
    front_type = zmq.PULL
    back_type = zmq.PUSH
    label = "streamer"

    def _relayable(self) -> bool:
        return bool(self._urls)
