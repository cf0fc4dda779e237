"""A message over the node's ``max_message_size`` fails at the sender, at once and before anything
is sent: ``MessageTooLargeError`` (with ``.size`` and ``.limit``) from ``request``, ``publish``
(``Publisher.send``) and ``push`` (``Pusher.send``), sync and asyncio.

Receivers enforce the same limit with ZeroMQ's MAXMSGSIZE, which drops the connection of a peer
that sends more: so a too-large message that went out would cost the connection and every message
queued behind it. Each test checks that the receiver got nothing of the refused message and still
gets the next one, and that the refusal does not wait for a provider or a timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import pytest

import zmqfabric as zf
import zmqfabric.aio
from zmqfabric.constants import MAX_MESSAGE_SIZE

#: Bound for waits that should succeed.
WAIT = 20.0
#: "At once": the refusal takes no wait for a provider, a connection or a timeout (s).
AT_ONCE = 0.5
#: Over the default limit (64 MiB): travels raw, uncopied, so the check is on its length.
HUGE = b"\0" * (70 * 1000 * 1000)
#: A small limit, for msgpack bodies over it.
SMALL_LIMIT = 4096
BIG_DICT = {"text": "x" * (2 * SMALL_LIMIT)}


def refused(send: Callable[[], Any], limit: int) -> zf.MessageTooLargeError:
    start = time.monotonic()
    with pytest.raises(zf.MessageTooLargeError) as err:
        send()
    assert time.monotonic() - start < AT_ONCE
    assert err.value.limit == limit and err.value.size > limit
    assert isinstance(err.value, zf.LocalProtocolError)
    return err.value


@pytest.mark.parametrize(
    ("too_big", "limit"),
    [(HUGE, MAX_MESSAGE_SIZE), (memoryview(HUGE), MAX_MESSAGE_SIZE), (BIG_DICT, SMALL_LIMIT)],
    ids=["70 MB bytes", "70 MB memoryview", "msgpack over a configured limit"],
)
def test_every_sender_refuses_a_body_over_the_limit_before_it_goes_out(
    make_node, name, too_big: Any, limit: int
) -> None:
    config = zf.NodeConfig(max_message_size=limit)
    svc, stream, pipe = name("echo"), name("ticks"), name("jobs")
    server = zf.Node(name("server"), config=config)
    got: list[Any] = []

    @server.reply(svc)
    def echo(body: Any) -> Any:
        got.append(body)
        return body

    server.serve_in_background()
    try:
        client = make_node("client", config=config)
        refused(lambda: client.request(name("nobody"), too_big, timeout=WAIT), limit)  # at once
        client.wait_for_endpoint("rep", svc, WAIT)
        refused(lambda: client.request(svc, too_big, timeout=WAIT), limit)
        assert client.request(svc, "small", timeout=WAIT) == "small"
        assert got == ["small"]  # the provider got nothing else (and kept the connection)

        publisher = server.publisher(stream)
        client.wait_for_endpoint("pub", stream, WAIT)  # the subscription connects as it is made
        sub = client.subscribe(stream)
        assert publisher.wait_subscribers(1, WAIT) == 1
        refused(lambda: publisher.send("t", too_big), limit)
        publisher.send("t", "small")
        assert sub.recv(timeout=WAIT) == ("t", "small")

        puller = server.puller(pipe)
        pusher = client.pusher(pipe)
        assert pusher.wait_ready(WAIT)
        refused(lambda: pusher.send(too_big, timeout=WAIT), limit)
        pusher.send("small", timeout=WAIT)
        assert puller.recv(timeout=WAIT) == "small"
    finally:
        server.close()


def test_asyncio_senders_refuse_70_mb(name) -> None:
    svc, stream, pipe = name("echo"), name("ticks"), name("jobs")

    async def refused_async(send: Callable[[], Any]) -> None:
        start = time.monotonic()
        with pytest.raises(zf.MessageTooLargeError) as err:
            await send()
        assert time.monotonic() - start < AT_ONCE
        assert err.value.limit == MAX_MESSAGE_SIZE and err.value.size == len(HUGE)

    async def main() -> None:
        server = zmqfabric.aio.Node(name("server"))

        @server.reply(svc)
        async def echo(body: Any) -> Any:
            return body

        async with server, zmqfabric.aio.Node(name("client")) as client:
            serving = asyncio.create_task(server.run(handle_signals=False))
            try:
                await client.wait_for_endpoint("rep", svc, WAIT)
                await refused_async(lambda: client.request(svc, HUGE, timeout=WAIT))
                assert await client.request(svc, "small", timeout=WAIT) == "small"

                publisher = server.publisher(stream)
                sub = client.subscribe(stream)
                assert await publisher.wait_subscribers(1, WAIT) == 1
                with pytest.raises(zf.MessageTooLargeError):
                    publisher.send("t", HUGE)
                publisher.send("t", "small")
                assert await sub.recv(timeout=WAIT) == ("t", "small")

                puller = server.puller(pipe)
                pusher = client.pusher(pipe)
                assert await pusher.wait_ready(WAIT)
                await refused_async(lambda: pusher.send(HUGE, timeout=WAIT))
                await pusher.send("small", timeout=WAIT)
                assert await puller.recv(timeout=WAIT) == "small"
            finally:
                server.stop()
                await serving

    asyncio.run(asyncio.wait_for(main(), 3 * WAIT))
