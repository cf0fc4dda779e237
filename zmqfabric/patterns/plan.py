"""Plans: an algorithm written once for the sync and the asyncio API, driven by either.

A plan is a generator that makes every decision of one call (a request, a receive, a control
call, a wait on the directory) and yields a ``(step, argument)`` pair wherever it must wait; the
driver does that wait and sends its result back into the plan. The plan's return value is the
call's result, its exceptions the call's errors. :func:`drive` waits by blocking the calling
thread, :func:`drive_async` by awaiting; nothing else differs (httpx's ``auth_flow`` with
``sync_auth_flow``/``async_auth_flow``, h11's sans-IO idea).

A driver is given the waits of the plan's owner: a mapping from each step to a callable that
takes the step's argument (a coroutine function for :func:`drive_async`). Steps and what the
plan gets back:

- :data:`RECV` (deadline): the next message's frames, or None at the deadline;
- :data:`WAIT_PROVIDERS` (deadline): True once a provider is connected, False at the deadline;
- :data:`WAIT_USABLE` (deadline): a provider's handshake succeeded, or every one finished (some
  refused) (bool);
- :data:`WAIT_CHANGE` (deadline): None after a directory change or connection event, or at the
  deadline;
- :data:`WAIT_DIRECTORY` ((directory, predicate, deadline)): True once ``predicate()`` holds
  (checked again after every directory change), False at the deadline;
- :data:`POLL` ((items, deadline)): the ``{socket: events}`` of ``[(socket, mask)...]``, empty at
  the deadline;
- :data:`READABLE` (deadline): None once the handle's socket may have input, or at the deadline
  (an asyncio handle's wait ends with ClosedError when the handle is closed meanwhile).

The last two need no owner: :data:`BLOCKING` and :data:`AWAITING` hold them. Deadlines are
monotonic (``None``: no deadline). Either driver closes the plan when it ends, so ``finally``
blocks in a plan run when the call fails or is cancelled.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Generator, Mapping, TypeVar

import zmq
import zmq.asyncio

from ..discovery.directory import Directory
from ..transport.frames import ms_left, s_left
from ..transport.sockets import translate_zmq_errors

T = TypeVar("T")
#: A plan that returns a T: it yields (step, argument) and is sent each step's result.
Plan = Generator[tuple[int, Any], Any, T]

RECV = 0
WAIT_PROVIDERS = 1
WAIT_USABLE = 2
WAIT_CHANGE = 3
WAIT_DIRECTORY = 4
POLL = 5
READABLE = 6

PollItems = list[tuple[zmq.Socket, int]]


def drive(plan: Plan[T], waits: Mapping[int, Callable[[Any], Any]]) -> T:
    """Run ``plan`` to its end in this thread, blocking in ``waits[step](argument)``."""
    result = None
    try:
        while True:
            step, argument = plan.send(result)
            result = waits[step](argument)
    except StopIteration as done:
        return done.value
    finally:
        plan.close()


async def drive_async(plan: Plan[T], waits: Mapping[int, Callable[[Any], Awaitable[Any]]]) -> T:
    """Run ``plan`` to its end in the running loop, awaiting ``waits[step](argument)``."""
    try:
        step, argument = next(plan)
        while True:
            step, argument = plan.send(await waits[step](argument))
    except StopIteration as done:
        return done.value
    finally:
        plan.close()


# --- waits that need no owner ---------------------------------------------------------------


def wait_directory(argument: tuple[Directory, Callable[[], bool], float | None]) -> bool:
    """WAIT_DIRECTORY, blocking: on the directory's condition."""
    directory, predicate, deadline = argument
    return directory.wait_for(predicate, s_left(deadline))


async def wait_directory_async(
    argument: tuple[Directory, Callable[[], bool], float | None]
) -> bool:
    """WAIT_DIRECTORY, awaiting: the directory calls a listener on every change (in whichever
    thread made it), which wakes this coroutine through the loop; it never blocks the loop."""
    directory, predicate, deadline = argument
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def on_change(_: object) -> None:
        try:
            loop.call_soon_threadsafe(changed.set)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    unlisten = directory.listen(on_change)
    try:
        while True:
            changed.clear()  # before the check: a change from now on wakes the wait below
            if predicate():
                return True
            left = s_left(deadline)
            if left == 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), left)
            except asyncio.TimeoutError:
                return predicate()
    finally:
        unlisten()


def poll(argument: tuple[PollItems, float | None]) -> dict[zmq.Socket, int]:
    """POLL, blocking. Raises ClosedError when the node's context is terminated meanwhile."""
    items, deadline = argument
    poller = zmq.Poller()
    for sock, mask in items:
        poller.register(sock, mask)
    with translate_zmq_errors("wait for a socket"):
        return dict(poller.poll(ms_left(deadline)))


async def poll_async(argument: tuple[PollItems, float | None]) -> dict[zmq.Socket, int]:
    """POLL, awaiting (plain sockets too: pyzmq's asyncio poller watches their file
    descriptors in the loop)."""
    items, deadline = argument
    poller = zmq.asyncio.Poller()
    for sock, mask in items:
        poller.register(sock, mask)
    with translate_zmq_errors("wait for a socket"):
        return dict(await poller.poll(ms_left(deadline)))


#: The owner-free waits, blocking and awaiting.
BLOCKING: Mapping[int, Callable[[Any], Any]] = {WAIT_DIRECTORY: wait_directory, POLL: poll}
AWAITING: Mapping[int, Callable[[Any], Awaitable[Any]]] = {
    WAIT_DIRECTORY: wait_directory_async,
    POLL: poll_async,
}
