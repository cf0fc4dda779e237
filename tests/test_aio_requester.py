"""The asyncio requester's own wait for replies (``AsyncRequester._await_reply``): it waits on a
duplicate of the socket's ZeroMQ descriptor that stays registered with the loop, with one timer
for consecutive requests. What could break: a deadline missed because the timer was set for an
earlier request's longer timeout, a loop that spins on a descriptor nobody reads (a late reply
arriving between requests), a close that leaves a request waiting, a leaked descriptor."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

import zmqfabric as zf
from tests.helpers import wait_until
from tests.test_aio import SLOW, Serving, bound, run
from zmqfabric.aio import Node as AioNode


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_short_timeout_after_a_long_one_is_kept(name) -> None:
    """The timer set for a request of a long timeout fires after a later, shorter deadline: it
    is set again, and the short request times out on time; its late reply is dropped."""
    service = name("sleepy")

    async def main() -> None:
        provider = AioNode(name("provider"))
        release = asyncio.Event()

        @provider.reply(service)
        async def answer(body: str) -> str:
            if body == "hang":
                await asyncio.wait_for(release.wait(), SLOW)
            return body

        async with provider, Serving(provider), AioNode(name("client")) as client:
            requester = client.requester(service)
            assert await bound(requester.request("first", timeout=SLOW)) == "first"
            start = time.monotonic()
            with pytest.raises(zf.RequestTimeoutError):
                await bound(requester.request("hang", timeout=0.3))
            assert 0.25 <= time.monotonic() - start < SLOW / 4
            release.set()  # the late reply arrives while no request waits
            assert await bound(requester.request("next", timeout=SLOW)) == "next"
            requester.close()

    run(main)


def test_a_reply_arriving_between_requests_does_not_spin_the_loop(name) -> None:
    """A late reply makes the descriptor readable while no request waits: the loop must not
    call the requester on every turn until the next request (a busy loop). Counted as calls of
    the requester's descriptor callback during a quiet 0.3 s."""
    service = name("late")

    async def main() -> None:
        provider = AioNode(name("provider"))
        release = asyncio.Event()
        answered = asyncio.Event()

        @provider.reply(service)
        async def answer(body: str) -> str:
            if body == "late":
                await asyncio.wait_for(release.wait(), SLOW)
                answered.set()
            return body

        async with provider, Serving(provider), AioNode(name("client")) as client:
            requester = client.requester(service)
            calls = 0
            wake = requester._replies._wake

            def counted() -> None:
                nonlocal calls
                calls += 1
                wake()

            requester._replies._wake = counted  # type: ignore[method-assign]  # before the first wait
            assert await bound(requester.request("warm", timeout=SLOW)) == "warm"
            with pytest.raises(zf.RequestTimeoutError):
                await bound(requester.request("late", timeout=0.1))
            before = calls
            release.set()
            await bound(answered.wait())
            await asyncio.sleep(0.3)
            assert calls - before <= 5  # one wake-up for the reply, not one per loop turn
            assert await bound(requester.request("after", timeout=SLOW)) == "after"
            requester.close()

    run(main)


def test_closing_a_requester_ends_a_request_awaiting_its_reply(name) -> None:
    """Closed while its request awaits the reply (not the providers): ClosedError at once. And
    the descriptor a requester waits on is closed with it: 40 requesters that each waited for
    a reply and were closed leave the process's descriptors where they were (ZeroMQ closes its
    own in a thread of its own, later: waited for)."""
    service, echo = name("never"), name("echo")

    async def main() -> None:
        provider = AioNode(name("provider"))
        started = asyncio.Event()
        provider.reply(echo)(lambda body: body)

        @provider.reply(service)
        async def answer(body: Any) -> Any:
            started.set()
            await asyncio.sleep(SLOW)
            return body

        async with provider, Serving(provider), AioNode(name("client")) as client:
            requester = client.requester(service)
            pending = asyncio.create_task(requester.request("x", timeout=SLOW))
            await bound(started.wait())
            await asyncio.sleep(0.05)  # the requester waits on its descriptor now
            start = time.monotonic()
            requester.close()
            with pytest.raises(zf.ClosedError):
                await bound(pending)
            assert time.monotonic() - start < SLOW / 4

            await bound(client.request(echo, 0, timeout=SLOW))  # one requester stays idle
            fds = _open_fds()
            for i in range(40):
                requester = client.requester(echo)
                assert await bound(requester.request(i, timeout=SLOW)) == i
                requester.close()
            await bound(asyncio.to_thread(
                wait_until, lambda: _open_fds() <= fds + 10, SLOW, "closed sockets' descriptors",
                detail=lambda: f"{_open_fds()} open, {fds} before"))

    run(main)
