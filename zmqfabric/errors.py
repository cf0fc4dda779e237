"""Errors of zmqfabric. Every error the fabric raises derives from :class:`FabricError`.

::

    FabricError
    ├── LocalProtocolError (ValueError)        you asked for something invalid
    │   ├── InvalidNameError                   a node/endpoint/topic name breaks the rules
    │   └── MessageTooLargeError               a body over the configured size limit
    ├── RemoteProtocolError (ValueError)       a peer sent frames or records we cannot accept
    ├── FabricTimeoutError (TimeoutError)      a bounded wait ran out
    │   ├── NoProviderError (LookupError)      nobody offers that service/pipeline (yet)
    │   └── RequestTimeoutError                providers exist but none answered in time
    ├── NodeNotFoundError (LookupError)        no node of that name in the directory
    ├── AuthorizationError (PermissionError)   a secured peer refused our key
    ├── RemoteError                            the remote handler raised; carries its type and text
    ├── TaskFailedError                        a task failed its last attempt and was dead-lettered
    ├── JournalError (OSError)                 the task journal cannot be opened or written
    ├── NameConflictError                      another live node already uses this name
    └── ClosedError                            the node or handle was closed (by you)

Each error carries the data a caller needs (``.service``, ``.timeout``, ``.peer``...) and is
raised ``from`` its cause. :func:`zmqfabric.sockets.translate_zmq_errors` is the one place where
``zmq.ZMQError`` becomes one of these.
"""

from __future__ import annotations


class FabricError(Exception):
    """Root of every zmqfabric error."""


class LocalProtocolError(FabricError, ValueError):
    """The caller asked for something the fabric cannot do (your side is at fault)."""


class InvalidNameError(LocalProtocolError):
    """A node, endpoint or topic name breaks the naming rules."""

    def __init__(self, what: str, name: object, rule: str) -> None:
        self.what = what
        self.name = name
        self.rule = rule
        super().__init__(f"invalid {what} name {name!r}: {rule}")


class MessageTooLargeError(LocalProtocolError):
    """A message is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"message of {size} bytes exceeds the limit of {limit} bytes")


class RemoteProtocolError(FabricError, ValueError):
    """A peer sent frames or a discovery record that break the protocol (their side is at fault)."""


class FabricTimeoutError(FabricError, TimeoutError):
    """A bounded wait ran out."""

    def __init__(self, message: str, *, timeout: float | None = None) -> None:
        self.timeout = timeout
        super().__init__(message)


class NoProviderError(FabricTimeoutError, LookupError):
    """No node offers the endpoint within the timeout."""

    def __init__(self, kind: str, name: str, timeout: float | None) -> None:
        self.kind = kind
        self.name = name
        self.service = name
        super().__init__(
            f"no node offers {kind} {name!r} (waited {_secs(timeout)}); "
            f"check the name and that a provider is running in this scope (`zmqfabric ls`)",
            timeout=timeout,
        )


class RequestTimeoutError(FabricTimeoutError):
    """Providers of the service exist, but none answered within the timeout."""

    def __init__(self, service: str, timeout: float | None, attempts: int, providers: int) -> None:
        self.service = service
        self.attempts = attempts
        self.providers = providers
        super().__init__(
            f"service {service!r} did not answer within {_secs(timeout)} "
            f"({attempts} attempt{'s' if attempts != 1 else ''}, {providers} provider"
            f"{'s' if providers != 1 else ''} known)",
            timeout=timeout,
        )


class NodeNotFoundError(FabricError, LookupError):
    """No node of that name is in the directory."""

    def __init__(self, name: str, timeout: float | None = None) -> None:
        self.name = name
        self.timeout = timeout
        super().__init__(f"no node named {name!r} found (waited {_secs(timeout)})")


class AuthorizationError(FabricError, PermissionError):
    """Every provider of an endpoint refused our CURVE key (or we had no key for them), or
    this node refuses theirs (``ours`` says why)."""

    def __init__(self, kind: str, name: str, servers: list[str], ours: str | None = None) -> None:
        self.kind = kind
        self.name = name
        self.servers = servers
        #: Why this node refuses them instead (e.g. their key is not in our allow-list), or None.
        self.ours = ours
        if ours is not None:
            super().__init__(f"{kind} {name!r}: this node refuses {', '.join(servers)}: {ours}")
            return
        super().__init__(
            f"{kind} {name!r}: refused by {', '.join(servers)}: this node's public key is not "
            f"in their allow-list (add it there with `zmqfabric keys allow`)"
        )


class RemoteError(FabricError):
    """The remote handler raised. ``.type`` and ``.text`` describe the remote exception."""

    def __init__(self, service: str, type_: str, text: str, peer: str | None = None) -> None:
        self.service = service
        self.type = type_
        self.text = text
        self.peer = peer
        where = f" on {peer}" if peer else ""
        super().__init__(f"service {service!r}{where} failed: {type_}: {text}")


class NameConflictError(FabricError):
    """Another live node already uses this node name."""

    def __init__(
        self, name: str, other_host: str, other_id: str, other_address: str | None = None
    ) -> None:
        self.name = name
        self.other_host = other_host
        self.other_id = other_id
        self.other_address = other_address
        at = f" ({other_address})" if other_address else ""
        super().__init__(
            f"node name {name!r} is already used by node {other_id} on host {other_host!r}{at}; "
            f"choose another name, or let the node take a free suffix (on_conflict='suffix')"
        )


class TaskFailedError(FabricError):
    """A task failed its last attempt and was dead-lettered. ``.error_type`` and ``.error`` describe
    the last failure (a handler's exception, ``WorkerLost`` or ``DeadlineExceeded``)."""

    def __init__(
        self, name: str, task_id: str, attempts: int, error_type: str, error: str
    ) -> None:
        self.name = name
        self.task_id = task_id
        self.attempts = attempts
        self.error_type = error_type
        self.error = error
        super().__init__(
            f"task {task_id} of {name!r} failed after {attempts} attempt"
            f"{'s' if attempts != 1 else ''}: {error_type}: {error}"
        )


class JournalError(FabricError, OSError):
    """The task journal cannot be opened or written (``.path`` names it)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"task journal {path!r}: {reason}")


class ClosedError(FabricError):
    """The node or handle was closed; it cannot be used any more."""


def _secs(timeout: float | None) -> str:
    return "forever" if timeout is None else f"{timeout:g} s"
