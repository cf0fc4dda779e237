"""What membership and liveness use of their own node: a structural type, so that discovery
needs nothing above it (the node's :class:`~zmqfabric.runtime.NodeRuntime` satisfies it)."""

from __future__ import annotations

from typing import Protocol

from ..config import NodeConfig
from ..core.records import NodeRecord
from ..stats import Counters
from ..transport.sockets import SocketFactory
from .directory import Directory


class LocalNode(Protocol):
    name: str
    node_id: str
    advertised: bool
    config: NodeConfig
    counters: Counters
    directory: Directory
    sockets: SocketFactory

    @property
    def record(self) -> NodeRecord: ...

    def rename(self, name: str) -> None: ...
