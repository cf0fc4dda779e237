"""Reliable tasks, in one folder: the producer's registry and dispatcher thread, the worker
endpoint, the journal and the dead letters. The decisions live in the pure
:mod:`zmqfabric.core.tasktable`."""

from .registry import TaskConfig, TaskHandle
from .worker import TaskInfo, current_task

__all__ = ["TaskConfig", "TaskHandle", "TaskInfo", "current_task"]
