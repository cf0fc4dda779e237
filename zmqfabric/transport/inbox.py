"""A mailbox for a thread that sleeps in a poller: other threads append to a deque and wake it
through a pipe whose read end sits in that poller.

The pipe is written only while the owner sleeps (it raises ``sleeping`` before polling and
checks the deque once more), so a burst of posts to a busy owner costs no system call.
"""

from __future__ import annotations

import collections
import os
from typing import Any


class Mailbox:
    """``items`` is the deque (owner: popleft; others: append through ``post``). ``open()`` makes
    the pipe and returns the fd to poll; ``close()`` closes it. Thread-safe except as noted."""

    def __init__(self) -> None:
        self.items: collections.deque[Any] = collections.deque()
        self.sleeping = False
        self._r = self._w = -1

    def open(self) -> int:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        return self._r

    @property
    def fd(self) -> int:
        return self._r

    def post(self, item: Any, *, wake: bool = False) -> None:
        """Append ``item``; wake the owner if it sleeps (or always, with ``wake=True``)."""
        self.items.append(item)
        if wake or self.sleeping:
            self.wake()

    def wake(self) -> None:
        try:
            os.write(self._w, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full (already woken) or closed (the owner is gone)

    def sleep_timeout(self, timeout: int) -> int:
        """The owner is about to poll for ``timeout`` ms: 0 if there is mail, else ``timeout``
        with ``sleeping`` raised (the owner lowers it after polling). Owner only."""
        if self.items or not timeout:
            return 0
        self.sleeping = True
        return 0 if self.items else timeout  # posted while we were deciding: do not sleep on it

    def drain_pipe(self) -> None:
        """Empty the pipe after a wake-up. Owner only."""
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Close the pipe. The fd numbers are forgotten first, so a late ``wake()`` cannot write
        into a descriptor that was reused meanwhile. Idempotent."""
        fds = (self._r, self._w)
        self._r = self._w = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
