"""Reliable tasks, in one folder: the config, the submitter's handle, the node's registry, the
producer's dispatcher thread, the worker endpoint, the journal and the dead letters. The
decisions live in the pure :mod:`zmqfabric.core.tasktable`."""

from .config import TaskConfig
from .handle import TaskHandle
from .worker import TaskInfo, current_task

__all__ = ["TaskConfig", "TaskHandle", "TaskInfo", "current_task"]
