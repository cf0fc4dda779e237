"""The owner-thread inbox: how other threads hand work to the thread that owns some sockets.

A socket belongs to one thread. Another thread (zeroconf's, a user's, a signal handler) never
touches it: it posts a callable to the owner's :class:`Inbox`, and the owner calls it between two
polls. The inbox is a deque of ``(fn, args)`` plus a pipe whose read end sits in the owner's
poller next to its sockets::

    inbox.open()
    poller.register(inbox.fd, zmq.POLLIN)
    while running:
        events = inbox.poll(poller, timeout_ms)   # sleeps only if nothing is queued
        inbox.run_pending()                       # calls what was posted, in order
        ...                                       # the owner's own sockets, from ``events``

    # any thread:
    inbox.post(peers.watch, record)

The pipe is written only while the owner sleeps: :meth:`poll` raises ``sleeping`` before it
polls and looks at the deque once more, so a burst of posts to a busy owner costs no system call.
An owner that cannot use :meth:`poll` everywhere (it polls the fd from several pollers, or keeps
work queued while it sleeps) makes its inbox with ``always_wake=True``: then every post writes.
An owner that expects a stream of posts a little apart (durable task submissions, a commit apart)
naps instead of sleeping (``poll(..., wake=False)``): posts do not wake it, it takes them by the
batch when the nap ends. An owner that polls its own state rather than posted calls (a queue it
shares under a lock) is told of a change with :meth:`nudge`: written like a post (once per sleep),
and the owner's next poll does not sleep.

Thread-safety: :meth:`post`, :meth:`nudge` and :meth:`wake` are thread-safe and signal-safe
(a Python signal handler may call them); :meth:`poll`, :meth:`run_pending` and :meth:`defer` are
for the owner only; :meth:`open` and :meth:`close` belong to whoever starts and stops the owner
(``close`` after the owner stopped polling); :meth:`run_leftovers`, once the owner is gone, to
any thread.
Under asyncio the same job is ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Protocol


class Poller(Protocol):
    """What :meth:`Inbox.poll` needs of a poller (``zmq.Poller`` is one)."""

    def poll(self, timeout: int | None = ...) -> list[tuple[Any, int]]: ...


class WakePipe:
    """A non-blocking self-pipe: any thread writes a byte to wake the thread polling ``fd``.

    ``fd`` is the read end to poll for POLLIN, ``write_fd`` the write end (for
    ``signal.set_wakeup_fd``); both are -1 while closed. Read them, never assign them."""

    __slots__ = ("fd", "write_fd")

    def __init__(self) -> None:
        self.fd = self.write_fd = -1

    def open(self) -> int:
        """Make the pipe (unless open); returns ``fd``."""
        if self.fd < 0:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self.fd, self.write_fd = r, w
        return self.fd

    def wake(self) -> None:
        """Thread-safe and signal-safe; never blocks."""
        try:
            os.write(self.write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # pipe full (already woken) or closed (the owner is gone)

    def drain(self) -> None:
        """Empty the pipe after a wake-up. Owner only."""
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Close both ends. The fd numbers are forgotten first, so a late ``wake()`` cannot write
        into a descriptor that was reused meanwhile. Idempotent."""
        fds = (self.fd, self.write_fd)
        self.fd = self.write_fd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


class Inbox:
    """Callables posted by any thread, called by the one owner thread. See the module docstring.

    ``pending`` is the deque of ``(fn, args)``; other code reads only its truthiness ("is work
    waiting?", one C-level test that a hot path can afford) and never changes it.
    """

    __slots__ = ("pending", "sleeping", "_pipe", "_always_wake", "_woken", "_nudged")

    def __init__(self, *, always_wake: bool = False) -> None:
        self.pending: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = (
            collections.deque()
        )
        #: Raised by the owner while it sleeps in :meth:`poll`: posts must write the pipe.
        self.sleeping = always_wake
        self._always_wake = always_wake
        #: A post has written the pipe during this sleep: later posts need not (one system call
        #: per sleep, not one per post, while the owner waits for the GIL after waking).
        self._woken = False
        #: A nudge since the owner last returned from :meth:`poll`: it must not sleep.
        self._nudged = False
        self._pipe = WakePipe()

    # --- lifetime (whoever starts and stops the owner) ---------------------------------------

    def open(self) -> int:
        """Make the wake-up pipe; returns the fd the owner polls. Posts made before are dropped."""
        return self._pipe.open()

    def close(self, *, drop: bool = True) -> None:
        """Close the pipe and drop what is still queued; later posts are dropped (``post``
        returns False). Call once the owner no longer polls (after joining it). ``drop=False``
        keeps what is queued for :meth:`run_leftovers`: no post that returned True is lost, even
        one racing with this close. Idempotent."""
        self._pipe.close()
        if drop:
            self.pending.clear()

    @property
    def fd(self) -> int:
        """The pipe's read end, to register in the owner's poller (-1 while closed)."""
        return self._pipe.fd

    @property
    def wakeup_fd(self) -> int:
        """The pipe's write end, for ``signal.set_wakeup_fd`` (a signal wakes the owner)."""
        return self._pipe.write_fd

    @property
    def closed(self) -> bool:
        return self._pipe.fd < 0

    # --- any thread ----------------------------------------------------------------------------

    def post(self, fn: Callable[..., object], *args: Any) -> bool:
        """Queue ``fn(*args)`` for the owner and wake it if it sleeps. False (and dropped) when
        the inbox is not open. Thread-safe and signal-safe; never blocks."""
        if self._pipe.fd < 0:
            return False
        self.pending.append((fn, args))
        # Read after the append: see poll() for why no post is missed. A poster that finds
        # _woken raised skips the write: the one that raised it writes right after.
        if self.sleeping and not self._woken:
            self._woken = not self._always_wake
            self._pipe.wake()
        return True

    def nudge(self) -> None:
        """Tell the owner that its own state changed (it re-reads it after its next poll, which
        does not sleep): a write only if it sleeps, once per sleep, as :meth:`post`. For a stream
        of changes from another thread (a flood of hints): one system call and one wake-up per
        sleep, not one per change. Thread-safe and signal-safe; never blocks."""
        self._nudged = True
        # Read after raising _nudged: poll() looks at it again after raising sleeping.
        if self.sleeping and not self._woken:
            self._woken = not self._always_wake
            self._pipe.wake()

    def wake(self) -> None:
        """Wake the owner without posting (it re-reads its own state). Thread-safe, signal-safe."""
        self._pipe.wake()

    # --- owner only ----------------------------------------------------------------------------

    def poll(
        self, poller: Poller, timeout_ms: int | None, *, wake: bool = True
    ) -> dict[Any, int]:
        """Poll ``poller`` (which has :attr:`fd` registered) and return its events as a dict.

        Sleeps up to ``timeout_ms`` (None: until woken) only when nothing is queued; the pipe is
        emptied if it was readable (``fd`` stays in the events). ``wake=False``: a nap, which
        posts do not cut short (they write nothing and wait for its end; :meth:`wake` still
        does). Raises what ``poller.poll`` raises. Owner only."""
        if self._always_wake:
            events = dict(poller.poll(0 if self._nudged else timeout_ms))
        elif not wake:
            events = dict(poller.poll(0 if self.pending or self._nudged else timeout_ms))
        else:
            timeout = 0
            if not self.pending and not self._nudged and timeout_ms != 0:
                self._woken = False  # before sleeping is raised: a late poster only wakes us
                self.sleeping = True
                # A post or nudge that read sleeping=False came before we raised it: look again.
                if not self.pending and not self._nudged:
                    timeout = timeout_ms if timeout_ms is not None else -1
            try:
                events = dict(poller.poll(timeout))
            finally:
                self.sleeping = False
        # Lowered before the owner re-reads its state: a nudge from now on is for the next poll.
        self._nudged = False
        if self._pipe.fd in events:
            self._pipe.drain()
        return events

    def run_pending(self, limit: int | None = None) -> int:
        """Call the queued callables in order: at most ``limit``, and never those posted after
        this call began (including by the callables themselves, or :meth:`defer`), which wait
        for the next call. A callable that raises propagates; the ones after it stay queued.
        Returns how many ran. Owner only."""
        pending = self.pending
        if not pending:
            return 0
        count = len(pending) if limit is None else min(limit, len(pending))
        for _ in range(count):
            fn, args = pending.popleft()
            fn(*args)
        return count

    def run_leftovers(self) -> int:
        """Once the owner is gone for good (it runs nothing more): call what is still queued,
        in order, in the calling thread, until nothing is. Thread-safe: several threads may
        call it while others post, and each callable runs once, in whichever thread takes it.
        The callables must know that their owner is gone (fail their work instead of doing it).
        A callable that raises propagates; the ones after it stay queued. Returns how many ran.
        """
        pending = self.pending
        count = 0
        while True:
            try:
                fn, args = pending.popleft()
            except IndexError:
                return count
            fn(*args)
            count += 1

    def defer(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue ``fn(*args)`` for the next :meth:`run_pending` without waking anyone: work that
        waits for something the owner itself will do first (read queued input). Owner only."""
        self.pending.append((fn, args))
