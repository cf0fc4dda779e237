"""The forwarder (pub/sub hub) and the streamer (pipeline hub): ``zmq.proxy_steerable`` relays in C,
so frames never pass through Python. A change of the back end's peers interrupts the proxy with
TERMINATE; the device thread applies the change and starts the proxy again (counters are kept)."""

from __future__ import annotations

import zmq

from zmqfabric.core.records import EndpointKind

from .base import STATISTICS, TERMINATE, Device, DeviceState, DeviceStats


class ProxyDevice(Device):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._carried = DeviceStats()
        self._restart_pending = False
        self._proxy_running = False

    def _interrupt(self) -> None:
        # Not relaying (starting, between runs, or paused): queued changes are applied when the
        # loop starts the proxy next (resume() interrupts again).
        if not self._proxy_running or self.state is DeviceState.PAUSED:
            return
        with self._steer_lock:
            if self._restart_pending or self._stopping:
                return
            self._restart_pending = True
            # The proxy's counters restart with it: collect them first.
            reply = self._steer_call_locked(STATISTICS)
            if reply is not None and len(reply) >= 8:
                self._carried = self._carried + DeviceStats.from_frames(reply)
            self._steer_call_locked(TERMINATE)

    def _carried_stats(self) -> DeviceStats:
        return self._carried

    def _relay(self) -> None:
        try:
            while not self._stopping:
                self._restart_pending = False
                self._proxy_running = True  # before applying: see _interrupt
                self._apply_ops()
                zmq.proxy_steerable(self.front, self.back, None, self.control)
        finally:
            self._proxy_running = False


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
    (``pusher(pipeline, via=<device node>)``), the back end deals to every puller found."""

    front_kind = EndpointKind.STREAMER
    relayed_kind = EndpointKind.PIPELINE
    front_type = zmq.PULL
    back_type = zmq.PUSH
    label = "streamer"
