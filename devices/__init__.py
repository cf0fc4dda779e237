"""Forwarding devices: nodes that relay one pattern, for topologies that want a hub.

- :class:`Queue`: request/reply load balancer with least-recently-used routing;
- :class:`Forwarder`: pub/sub hub (XSUB/XPUB, ``zmq.proxy_steerable``);
- :class:`Streamer`: pipeline hub (PULL/PUSH, ``zmq.proxy_steerable``).

A device runs inside a started node, whose name clients pass as ``via=``::

    with zf.Node("hub") as hub, Forwarder(hub, "prices"):
        hub.run()

Installed as ``zmqfabric.devices``.
"""

from .base import Device, DeviceState, DeviceStats
from .queue import Queue
from .relay import Forwarder, Streamer

KINDS = {"queue": Queue, "forwarder": Forwarder, "streamer": Streamer}

__all__ = ["KINDS", "Device", "DeviceState", "DeviceStats", "Forwarder", "Queue", "Streamer"]
