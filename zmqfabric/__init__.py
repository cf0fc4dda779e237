"""zmqfabric: a brokerless messaging fabric. Named nodes find each other with zeroconf and talk
over ZeroMQ request/reply, publish/subscribe and push/pull; messages are msgpack.

    import zmqfabric as zf
    with zf.Node("web") as web:
        reply = web.request("thumbnail", {"path": "a.png"}, timeout=2.0)
"""

from .config import NodeConfig, Scope
from .core.records import EndpointKind, NodeRecord
from .core.wire import Message
from .errors import (
    AuthorizationError,
    ClosedError,
    FabricError,
    FabricTimeoutError,
    InvalidNameError,
    JournalError,
    LocalProtocolError,
    MessageTooLargeError,
    NameConflictError,
    NodeNotFoundError,
    NoProviderError,
    RemoteError,
    RemoteProtocolError,
    RequestTimeoutError,
    TaskFailedError,
)
from .node import Node
from .tasks import TaskConfig, TaskHandle
from .tasks.worker import TaskInfo, current_task

__version__ = "0.1.0"

__all__ = [
    "AuthorizationError",
    "ClosedError",
    "EndpointKind",
    "FabricError",
    "FabricTimeoutError",
    "InvalidNameError",
    "JournalError",
    "LocalProtocolError",
    "Message",
    "MessageTooLargeError",
    "NameConflictError",
    "Node",
    "NodeConfig",
    "NodeNotFoundError",
    "NodeRecord",
    "NoProviderError",
    "RemoteError",
    "RemoteProtocolError",
    "RequestTimeoutError",
    "Scope",
    "TaskConfig",
    "TaskFailedError",
    "TaskHandle",
    "TaskInfo",
    "current_task",
    "__version__",
]
