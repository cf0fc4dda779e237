"""The values of reliable task dispatch: a task, its state, retry policy, outcomes and stats.
Pure: no IO, no clock (see :mod:`zmqfabric.core.tasktable` for the state machine over them)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from ..constants import (
    MAX_TASK_CREDIT,
    TASK_BACKOFF_MAX_S,
    TASK_BACKOFF_S,
    TASK_DEADLINE_S,
    TASK_MAX_ATTEMPTS,
)
from ..errors import LocalProtocolError

#: Error types of failures that are not a handler's exception.
WORKER_LOST = "WorkerLost"
DEADLINE_EXCEEDED = "DeadlineExceeded"


class TaskState(enum.Enum):
    PENDING = "pending"
    DELAYED = "delayed"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how late a task is retried. Raises LocalProtocolError for nonsense."""

    max_attempts: int = TASK_MAX_ATTEMPTS
    backoff_s: float = TASK_BACKOFF_S
    backoff_max_s: float = TASK_BACKOFF_MAX_S

    def __post_init__(self) -> None:
        if type(self.max_attempts) is not int or self.max_attempts < 1:
            raise LocalProtocolError("max_attempts must be an integer >= 1")
        if not 0 <= self.backoff_s <= self.backoff_max_s:
            raise LocalProtocolError("backoff must satisfy 0 <= backoff_s <= backoff_max_s")

    def delay(self, failures: int) -> float:
        """Seconds to wait before the retry that follows the ``failures``-th failure (from 1)."""
        return min(self.backoff_max_s, self.backoff_s * 2.0 ** min(failures - 1, 64))


def check_count(value: Any, what: str) -> int:
    """``value`` if it is a credit window or slot count (1..65535); raises LocalProtocolError."""
    if type(value) is not int or not 1 <= value <= MAX_TASK_CREDIT:
        raise LocalProtocolError(f"{what} must be an integer from 1 to {MAX_TASK_CREDIT}")
    return value


def is_failure(ok: Any, value: Any) -> bool:
    """Whether a result's ``ok`` and ``value`` are a well-formed failure: ``ok`` false and
    ``value`` ``{"type": str, "message": str}`` (docs/PROTOCOL.md, section 7.4)."""
    return (ok is False and isinstance(value, dict) and isinstance(value.get("type"), str)
            and isinstance(value.get("message"), str))


def check_deadline(deadline_s: float) -> float:
    if not isinstance(deadline_s, (int, float)) or not 0 < deadline_s < math.inf:
        raise LocalProtocolError("a task deadline must be a number of seconds > 0")
    return float(deadline_s)


class Task:
    """One task in a :class:`TaskTable`. Owned by its table: read it, do not change it.

    ``payload`` is the encoded body. ``attempts`` counts deliveries (the wire's ``attempt`` of the
    latest); ``charged`` counts the attempts used up: failures of deliveries that may have started
    running (the handler raised, it overran its deadline, or its worker was lost while it was one
    of the worker's running slots); the task is dead once ``charged`` reaches ``max_attempts``.
    ``suspect``: it was at a worker that was lost, so it is sent alone until it answers (see
    :class:`TaskTable`); ``hung_on``: the workers where a delivery of it overran its deadline.
    ``value`` is the ok result; ``error`` the last failure, ``(type, text)``.

    A plain class with ``__slots__``, not a dataclass: one is made per submitted task, and the
    submitter's handle (:class:`zmqfabric.tasks.handle.TaskHandle`) is a subclass that sets these
    fields itself (``FIELDS``), so a task is one object, not a task and a handle.
    """

    __slots__ = ("id", "payload", "key", "deadline_s", "max_attempts", "attempts", "charged",
                 "suspect", "hung_on", "state", "worker", "value", "error")
    #: Every field; a subclass's ``__init__`` sets each (tests check it).
    FIELDS = __slots__

    id: str
    payload: bytes
    key: str | None
    deadline_s: float
    max_attempts: int
    attempts: int
    charged: int
    suspect: bool
    hung_on: list[str] | None
    state: TaskState
    worker: str | None
    value: Any
    error: tuple[str, str] | None

    def __init__(self, id: str, payload: bytes, key: str | None = None, *,  # noqa: A002
                 deadline_s: float = TASK_DEADLINE_S,
                 max_attempts: int = TASK_MAX_ATTEMPTS) -> None:
        self.id = id
        self.payload = payload
        self.key = key
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.attempts = self.charged = 0
        self.suspect = False
        self.hung_on = self.worker = self.value = self.error = None
        self.state = _PENDING

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(id={self.id!r}, key={self.key!r}, "
                f"state={self.state.name}, attempts={self.attempts}, charged={self.charged}, "
                f"worker={self.worker!r}, error={self.error!r})")


_PENDING = TaskState.PENDING


@dataclass(frozen=True, slots=True)
class Outcome:
    """Tasks settled by one call: ``done`` (ok result in ``task.value``) and ``dead`` (failed
    their last attempt; ``task.error``)."""

    done: tuple[Task, ...] = ()
    dead: tuple[Task, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.done or self.dead)


NOTHING = Outcome()


@dataclass(frozen=True, slots=True)
class TaskTableStats:
    """A snapshot of one table's counters. ``queued`` includes tasks waiting for a retry;
    ``redelivered`` counts deliveries given to another worker at once (worker lost, deadline,
    worker stuck), ``requeued`` the part of them that was not charged an attempt (the delivery
    could not have started); ``hung`` is deliveries past their deadline that workers still hold
    (each holds a slot and a unit of credit there until it answers); ``refused`` counts malformed
    results dropped."""

    queued: int
    in_flight: int
    done: int
    retried: int
    redelivered: int
    dead: int
    late: int
    workers: int
    requeued: int = 0
    hung: int = 0
    refused: int = 0
