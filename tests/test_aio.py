"""The asyncio node (``zmqfabric.aio.Node``): every pattern with coroutines, in plain pytest tests
that drive ``asyncio.run`` themselves (no pytest-asyncio), every await bounded by ``wait_for``.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

import zmqfabric as zf
import zmqfabric.aio
from zmqfabric.aio import Node as AioNode

SLOW = 20.0
T = TypeVar("T")


def run(main: Callable[[], Awaitable[T]], timeout: float = 2 * SLOW) -> T:
    """Run ``main()`` in a fresh event loop, bounded as a whole."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)

    return asyncio.run(bounded())


async def bound(awaitable: Awaitable[T], timeout: float = SLOW) -> T:
    return await asyncio.wait_for(awaitable, timeout)


class Serving:
    """``async with Serving(node):`` runs ``node.run()`` as a task and stops it afterwards."""

    def __init__(self, node: AioNode) -> None:
        self.node = node
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AioNode:
        await bound(self.node.start())
        self.task = asyncio.create_task(self.node.run(handle_signals=False))
        return self.node

    async def __aexit__(self, *exc: object) -> None:
        self.node.stop()
        assert self.task is not None
        await bound(self.task)


# --- request/reply ---------------------------------------------------------------------------


def test_request_reply_with_sync_and_async_handlers(name) -> None:
    sync_svc, async_svc, failing = name("sync"), name("async"), name("fails")

    async def main() -> None:
        provider = AioNode(name("provider"))

        @provider.reply(sync_svc)
        def double(body: int) -> int:
            return body * 2

        @provider.reply(async_svc)
        async def later(body: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(0.01)
            return {"got": body, "loop": id(asyncio.get_running_loop())}

        @provider.reply(failing)
        async def fails(body: Any) -> None:
            await asyncio.sleep(0)
            raise KeyError(f"no such thing: {body}")

        async with provider, Serving(provider), AioNode(name("client")) as client:
            assert await bound(client.request(sync_svc, 21, timeout=SLOW)) == 42
            reply = await bound(client.request(async_svc, {"a": [1, 2]}, timeout=SLOW))
            assert reply == {"got": {"a": [1, 2]}, "loop": id(asyncio.get_running_loop())}
            with pytest.raises(zf.RemoteError) as err:
                await bound(client.request(failing, "x", timeout=SLOW))
            assert err.value.type == "KeyError" and "no such thing: x" in err.value.text
            assert err.value.service == failing
            # The service keeps serving after a handler error.
            assert await bound(client.request(sync_svc, 1, timeout=SLOW)) == 2
            requester = client.requester(sync_svc)
            assert [await bound(requester.request(i, timeout=SLOW)) for i in range(20)] == [
                2 * i for i in range(20)
            ]

    run(main)


def test_concurrent_requests_from_one_node(name) -> None:
    """Coroutines awaiting ``request`` on one node at once each get their own reply, also when
    replies come back out of order (two providers, the first one slower)."""
    service = name("echo")

    async def main() -> None:
        slow, fast = AioNode(name("slow")), AioNode(name("fast"))

        @slow.reply(service)
        async def slow_echo(body: int) -> list[Any]:
            await asyncio.sleep(0.05)
            return [body, "slow"]

        @fast.reply(service)
        async def fast_echo(body: int) -> list[Any]:
            return [body, "fast"]

        async with slow, fast, Serving(slow), Serving(fast), AioNode(name("client")) as client:
            await bound(asyncio.to_thread(
                client.directory.wait_for,
                lambda: len(client.directory.providers(zf.EndpointKind.REPLY, service)) == 2,
                SLOW,
            ))
            # Each call in flight borrows a requester of its own; one made for the burst sends
            # to whichever provider's connection is up first (the other's route refuses sends
            # until its handshake is done), so a first burst may reach one provider only.
            # Later bursts borrow the idle requesters of the first ones, connected to both.
            seen: set[str] = set()
            for _ in range(5):
                results = await bound(asyncio.gather(
                    *(client.request(service, i, timeout=SLOW) for i in range(10)),
                    return_exceptions=True,
                ))
                assert [r[0] if isinstance(r, list) else r for r in results] == list(range(10))
                seen |= {r[1] for r in results}
                if seen == {"slow", "fast"}:
                    break
            assert seen == {"slow", "fast"}

    run(main)


def test_async_provider_process_and_sync_client(procs, make_node, name) -> None:
    """Across processes, mixing APIs: an asyncio provider process, a sync client here."""
    service = name("svc")
    code = textwrap.dedent(
        """
        import asyncio, os
        import zmqfabric.aio

        async def main():
            node = zmqfabric.aio.Node(NAME)

            @node.reply(SVC)
            async def handle(body):
                await asyncio.sleep(0)
                return {"pid": os.getpid(), "body": body}

            async with node:
                print("READY", flush=True)
                await node.run()

        asyncio.run(main())
        """
    )
    child = procs.python(f"NAME = {name('provider')!r}\nSVC = {service!r}\n" + code,
                         timeout=SLOW)
    client = make_node("client")
    for i in range(20):
        assert client.request(service, i, timeout=SLOW) == {"pid": child.proc.pid, "body": i}
    child.signal(signal.SIGTERM)
    assert child.wait(SLOW) == 0, child.err_tail()


def test_no_provider_and_slow_provider(name) -> None:
    nobody, slow = name("nobody"), name("slow")

    async def main() -> None:
        provider = AioNode(name("provider"))

        never = asyncio.Event()

        @provider.reply(slow)
        async def sleepy(body: float) -> str:
            try:  # a handler busy for ``body`` seconds
                await asyncio.wait_for(never.wait(), body)
            except TimeoutError:
                pass
            return f"slept {body}"

        async with provider, Serving(provider), AioNode(name("client")) as client:
            start = time.monotonic()
            with pytest.raises(zf.NoProviderError) as err:
                await bound(client.request(nobody, {}, timeout=0.5, retries=1))
            assert 0.45 <= time.monotonic() - start < 3.0
            assert err.value.service == nobody and nobody in str(err.value)

            start = time.monotonic()
            with pytest.raises(zf.RequestTimeoutError) as timeout_err:
                await bound(client.request(slow, 0.6, timeout=0.2))
            assert 0.15 <= time.monotonic() - start < 3.0
            assert timeout_err.value.service == slow and timeout_err.value.providers == 1
            # The late answer to the abandoned call is not taken as the next call's answer.
            assert await bound(client.request(slow, 0.0, timeout=SLOW)) == "slept 0.0"

    run(main)


# --- publish/subscribe -----------------------------------------------------------------------


def test_pub_sub(name) -> None:
    stream = name("ticks")

    async def main() -> None:
        async with AioNode(name("pub")) as pub_node, AioNode(name("sub")) as sub_node:
            publisher = pub_node.publisher(stream)
            sub = sub_node.subscribe(stream, topics=["data", "ctl"])
            other = sub_node.subscribe(stream, topics=["nothing-matches"])
            assert await bound(sub.wait_ready(SLOW))
            first = asyncio.Event()
            received: list[tuple[str, Any]] = []

            async def consume() -> None:
                async for topic, body in sub:
                    if topic == "ctl.ping":
                        first.set()
                    elif topic == "ctl.end":
                        return
                    elif first.is_set():
                        received.append((topic, body))

            consumer = asyncio.create_task(consume())
            deadline = time.monotonic() + SLOW
            while not first.is_set():  # until the subscription has reached the publisher
                assert time.monotonic() < deadline, "subscriber never got a ping"
                publisher.send("ctl.ping", None)  # a plain call: PUB never waits
                await asyncio.sleep(0.01)
            for i in range(300):
                publisher.send("data" if i % 3 else "skip", {"i": i})
            publisher.send("ctl.end", None)
            await bound(consumer)

            assert received == [("data", {"i": i}) for i in range(300) if i % 3]
            with pytest.raises(zf.FabricTimeoutError):
                await bound(other.recv(timeout=0.1))
            assert await bound(other.recv_message(timeout=0.05)) is None

    run(main)


# --- push/pull -------------------------------------------------------------------------------


def test_push_pull_exactly_once_over_two_pullers(name) -> None:
    pipeline = name("jobs")

    async def main() -> None:
        async with AioNode(name("src")) as src, AioNode(name("w1")) as w1, \
                AioNode(name("w2")) as w2:
            pullers = {"w1": w1.puller(pipeline), "w2": w2.puller(pipeline)}
            ok = src.directory.wait_for(
                lambda: len(src.directory.providers(zf.EndpointKind.PIPELINE, pipeline)) == 2, 0
            ) or await bound(asyncio.to_thread(
                src.directory.wait_for,
                lambda: len(src.directory.providers(zf.EndpointKind.PIPELINE, pipeline)) == 2,
                SLOW,
            ))
            assert ok
            pusher = src.pusher(pipeline)
            assert await bound(pusher.wait_ready(SLOW))

            got: dict[str, list[Any]] = collections.defaultdict(list)
            done = asyncio.Event()
            total = 1000

            async def drain(key: str) -> None:
                async for body in pullers[key]:
                    got[key].append(body)
                    if sum(len(v) for v in got.values()) >= total + 2 and "probe" not in body:
                        done.set()

            tasks = [asyncio.create_task(drain(key)) for key in pullers]
            # Probe until both pullers are connected, so round robin covers both.
            deadline = time.monotonic() + SLOW
            probes = 0
            while len(got) < 2:
                assert time.monotonic() < deadline, f"only {list(got)} received probes"
                probes += 1
                await bound(pusher.send({"probe": probes}, timeout=SLOW))
                await asyncio.sleep(0.01)
            for i in range(total):
                await bound(pusher.send({"i": i}, timeout=SLOW))
            ids: collections.Counter[int] = collections.Counter()
            deadline = time.monotonic() + SLOW
            while len(ids) < total:
                assert time.monotonic() < deadline, f"{len(ids)} of {total} arrived"
                ids = collections.Counter(
                    b["i"] for bodies in got.values() for b in bodies if "i" in b
                )
                await asyncio.sleep(0.01)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

            assert set(ids) == set(range(total)) and set(ids.values()) == {1}
            per_puller = {k: sum(1 for b in v if "i" in b) for k, v in got.items()}
            assert min(per_puller.values()) >= total // 4, per_puller
            assert sum(1 for v in got.values() for b in v if "probe" in b) == probes

    run(main)


def test_pipeline_waits_and_timeouts(name) -> None:
    async def main() -> None:
        async with AioNode(name("lonely")) as node:
            pusher = node.pusher(name("nowhere"))
            assert await bound(pusher.wait_ready(0.1)) is False
            start = time.monotonic()
            with pytest.raises(zf.NoProviderError):
                await bound(pusher.send(1, timeout=0.2))
            assert 0.15 <= time.monotonic() - start < 3.0
            puller = node.puller(name("empty"))
            with pytest.raises(zf.FabricTimeoutError):
                await bound(puller.recv(timeout=0.1))
            assert await bound(puller.recv_message(timeout=0.05)) is None

    run(main)


# --- control and lifetimes -------------------------------------------------------------------


def test_control_ops_and_directory(name) -> None:
    async def main() -> None:
        async with AioNode(name("a")) as a, AioNode(name("b")) as b:
            record = await bound(a.wait_for_node(b.name, SLOW))
            assert record.name == b.name
            assert (await bound(a.ping(b.name, timeout=SLOW)))["node"] == b.name
            assert a.name in (await bound(b.info(a.name, timeout=SLOW)))["node"]
            assert "counters" in await bound(a.stats(b.name, timeout=SLOW))
            assert {a.name, b.name} <= {n.name for n in a.nodes()}
            with pytest.raises(zf.NodeNotFoundError):
                await bound(a.ping(name("nobody"), timeout=0.2))

    run(main)


def test_lifetimes(name) -> None:
    before = threading.active_count()

    async def main() -> None:
        node = AioNode(name("life"))
        assert node.state.value == "new"
        async with node:
            assert threading.active_count() > before
            publisher = node.publisher(name("s"))
        assert node.state.value == "closed" and publisher.closed
        await bound(node.close())  # idempotent
        for use in (
            lambda: node.request(name("x"), 1, timeout=0.1),
            lambda: node.start(),
            lambda: node.run(timeout=0.1),
        ):
            with pytest.raises(zf.ClosedError):
                await bound(use())
        for make in (node.publisher, node.subscribe, node.pusher, node.puller, node.requester):
            with pytest.raises(zf.ClosedError):
                make(name("x"))

        # stop() is thread-safe: a plain thread ends run().
        other = AioNode(name("stopped"))
        async with other:
            stopper = threading.Timer(0.1, other.stop)
            start = time.monotonic()
            stopper.start()
            await bound(other.run(timeout=SLOW, handle_signals=False))
            stopper.join(SLOW)
            assert time.monotonic() - start < SLOW / 2
            start = time.monotonic()
            await bound(other.run(timeout=0.2, handle_signals=False))
            assert 0.15 <= time.monotonic() - start < 3.0

    run(main)
    assert [t.name for t in threading.enumerate() if t.name.startswith("zmqfabric")] == []


def test_close_survives_a_slow_discovery_goodbye(name, monkeypatch) -> None:
    """Under load zeroconf's goodbye can outlast the close bound; close() must still succeed."""
    monkeypatch.setattr(zmqfabric.aio, "THREAD_JOIN_TIMEOUT_S", 0.05)

    async def main() -> None:
        node = AioNode(name("slow-bye"))
        await bound(node.start())
        goodbye = node._close_discovery

        def slow_goodbye() -> None:
            threading.Event().wait(0.2)  # a goodbye slower than the (shortened) bound
            goodbye()

        monkeypatch.setattr(node, "_close_discovery", slow_goodbye)
        await bound(node.close())
        assert node.state.value == "closed"

    run(main)


def test_closing_a_handle_or_its_node_ends_its_waits_with_closed_error(name) -> None:
    """pyzmq cancels what awaits a socket that closes; the coroutines awaiting a fabric handle
    get ClosedError instead (a cancellation they never asked for would end their task), and a
    task that is itself cancelled still gets its CancelledError."""
    stream, pipe, nobody = name("ticks"), name("jobs"), name("nobody")

    async def main() -> None:
        async with AioNode(name("closing")) as node:

            async def outcome(wait: Awaitable[Any]) -> str:
                try:
                    await wait
                except zf.ClosedError:
                    return "closed"
                return "returned"

            puller = node.puller(pipe)
            sub = node.subscribe(stream)
            requester = node.requester(nobody)
            pusher = node.pusher(name("nowhere"))
            publisher = node.publisher(name("lonely"))
            pending = [
                asyncio.create_task(outcome(puller.recv(timeout=SLOW))),
                asyncio.create_task(outcome(sub.recv(timeout=SLOW))),
                asyncio.create_task(outcome(pusher.wait_ready(SLOW))),
                asyncio.create_task(outcome(requester.request(1, timeout=SLOW))),
                asyncio.create_task(outcome(publisher.wait_subscribers(1, SLOW))),
            ]
            await asyncio.sleep(0)  # each is waiting now
            for handle in (puller, sub, pusher, requester, publisher):
                handle.close()
            assert await bound(asyncio.gather(*pending)) == ["closed"] * 5

            cancelled = asyncio.create_task(node.subscribe(stream).recv(timeout=SLOW))
            await asyncio.sleep(0)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await bound(cancelled)

            # The node closing closes its handles: the same for whoever awaits them.
            waiting = asyncio.create_task(outcome(node.puller(name("later")).recv(timeout=SLOW)))
            await asyncio.sleep(0)
            await bound(node.close())
            assert await bound(waiting) == "closed"

    run(main)
