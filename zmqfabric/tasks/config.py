"""How a node submits and serves reliable tasks: :class:`TaskConfig`, and the checks it shares
with the registry (task names, prefetch)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..constants import (
    MAX_TASK_CREDIT,
    TASK_BACKOFF_MAX_S,
    TASK_BACKOFF_S,
    TASK_DEADLINE_S,
    TASK_DEDUPE_WINDOW_S,
    TASK_MAX_ATTEMPTS,
    TASK_PREFETCH,
    TASK_QUEUE_LIMIT,
)
from ..core.records import validate_endpoint_name
from ..core.tasktable import RetryPolicy, check_deadline
from ..errors import InvalidNameError, LocalProtocolError
from .deadletters import SUFFIX as DEAD_SUFFIX

#: Task names leave room for the dead-letter stream "<name>.dead" (endpoint names: 64 chars).
MAX_TASK_NAME = 64 - len(DEAD_SUFFIX)


@dataclass(frozen=True, slots=True)
class TaskConfig:
    """How a node submits and serves reliable tasks. Every default is in
    :mod:`zmqfabric.constants`.

    ``journal``: path of the producer's journal (None: tasks live in memory only).
    ``dead_letter_file``: JSON-lines file of dead letters; None means ``<journal>.dead.jsonl``
    with a journal, and no file without one (dead letters still go to the stream
    ``<name>.dead`` and the log). ``deadline_s``, ``max_attempts``: per-task defaults that
    ``submit`` may override. ``prefetch``: a worker's default credit. ``dedupe_window_s``: how
    long after its task settled an idempotency key still returns that task's handle.
    """

    journal: str | None = None
    journal_fsync: bool = False
    dead_letter_file: str | None = None
    deadline_s: float = TASK_DEADLINE_S
    max_attempts: int = TASK_MAX_ATTEMPTS
    backoff_s: float = TASK_BACKOFF_S
    backoff_max_s: float = TASK_BACKOFF_MAX_S
    prefetch: int = TASK_PREFETCH
    queue_limit: int = TASK_QUEUE_LIMIT
    dedupe_window_s: float = TASK_DEDUPE_WINDOW_S

    def __post_init__(self) -> None:
        for field in ("journal", "dead_letter_file"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, os.fspath(value))
        check_deadline(self.deadline_s)
        RetryPolicy(self.max_attempts, self.backoff_s, self.backoff_max_s)  # raises if bad
        check_prefetch(self.prefetch)
        if type(self.queue_limit) is not int or self.queue_limit < 1:
            raise LocalProtocolError("queue_limit must be an integer >= 1")
        window = self.dedupe_window_s
        if not isinstance(window, (int, float)) or not 0 <= window < float("inf"):
            raise LocalProtocolError("dedupe_window_s must be a number of seconds >= 0")

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, self.backoff_s, self.backoff_max_s)

    @property
    def dead_letter_path(self) -> str | None:
        if self.dead_letter_file is not None:
            return self.dead_letter_file
        return None if self.journal is None else self.journal + ".dead.jsonl"


def check_prefetch(prefetch: object) -> int:
    """``prefetch`` if it is a valid credit window; raises LocalProtocolError otherwise."""
    if type(prefetch) is not int or not 1 <= prefetch <= MAX_TASK_CREDIT:
        raise LocalProtocolError(f"prefetch must be an integer from 1 to {MAX_TASK_CREDIT}")
    return prefetch


def validate_task_name(name: object) -> str:
    """``name`` if it is a valid task name; raises InvalidNameError otherwise."""
    valid = validate_endpoint_name(name, "task")
    if len(valid) > MAX_TASK_NAME:
        raise InvalidNameError("task", name, f"use at most {MAX_TASK_NAME} characters (the "
                               f"dead-letter stream is named <task>{DEAD_SUFFIX})")
    return valid
