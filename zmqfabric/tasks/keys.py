"""Idempotency keys of one producer: a second ``submit`` of a task name with a key that is
already in use returns the first task's handle instead of queuing a new task.

A key is in use while its task is unsettled, and for ``window`` seconds after it settled (done
or failed for good). Keys are per task name. At most ``limit`` settled keys are remembered (each
keeps its handle, and so its result): past that, the oldest are forgotten first, even within
the window. Keys of unsettled tasks are bounded by the queue limit and are never forgotten.

Thread-safe (one lock, held for a dictionary operation or a prune).
"""

from __future__ import annotations

import collections
import threading
import time

from .handle import TaskHandle


class KeyIndex:
    def __init__(self, window: float, limit: int) -> None:
        self.window = window
        self.limit = limit
        self._lock = threading.Lock()
        self._handles: collections.OrderedDict[tuple[str, str], TaskHandle] = (
            collections.OrderedDict())

    def __len__(self) -> int:
        return len(self._handles)

    def claim(self, handle: TaskHandle) -> TaskHandle:
        """The handle already holding ``(handle.name, handle.key)``, or ``handle`` itself once
        it holds the key (its task must then be queued, or :meth:`release` called)."""
        assert handle.key is not None
        slot = (handle.name, handle.key)
        now = time.monotonic()
        with self._lock:
            held = self._handles.get(slot)
            if held is not None and not self._expired(held, now):
                return held
            self._handles[slot] = handle
            self._handles.move_to_end(slot)
            self._prune(now)
            return handle

    def release(self, handle: TaskHandle) -> None:
        """``handle`` will not be queued after all (its submit failed): free its key."""
        assert handle.key is not None
        slot = (handle.name, handle.key)
        with self._lock:
            if self._handles.get(slot) is handle:
                del self._handles[slot]

    def _expired(self, handle: TaskHandle, now: float) -> bool:
        return handle.done() and now - handle.settled_at >= self.window

    def _prune(self, now: float) -> None:
        handles = self._handles
        while handles:
            oldest = next(iter(handles.values()))
            if not self._expired(oldest, now):
                break
            handles.popitem(last=False)
        if len(handles) > self.limit:  # rare: many keys settled within the window
            settled = [slot for slot, h in handles.items() if h.done()]
            for slot in settled[: len(handles) - self.limit * 9 // 10]:
                del handles[slot]
