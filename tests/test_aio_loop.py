"""No public API of the asyncio node blocks its event loop.

The loop runs in debug mode with a slow-callback threshold of 200 ms: asyncio then logs
"Executing <callback> took N seconds" for every callback (a task's step between two awaits) that
held the loop longer. Each API call below runs as a labelled step; the test fails, naming the
calls and the callbacks, if any step logged such a line.

Every wait is made to really wait: the other side of it (a sync helper node, run from plain
threads) acts LATER_S after the wait began, longer than the threshold. A wait that blocked the
loop instead of awaiting would hold it that long and be reported.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any

import zmqfabric as zf
from zmqfabric.aio import Node as AioNode
from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord

#: Bound for any one wait that should succeed (s).
SLOW = 20.0
#: The asyncio slow-callback threshold the test holds every call to (s). asyncio measures wall
#: time, so on a loaded 2-core machine a callback that never blocks can still read tens of ms
#: (CI once logged pyzmq's own event handler at 72 ms while the node's threads held the GIL);
#: a call that blocks instead of awaiting holds the loop LATER_S, well over this.
THRESHOLD_S = 0.2
#: How long the other side of a wait lets it wait before acting (s): well over THRESHOLD_S.
LATER_S = 0.6


class SlowCallbacks(logging.Handler):
    """Collects asyncio's "Executing ... took" lines logged from one thread (the loop's)."""

    def __init__(self, thread: int) -> None:
        super().__init__(logging.WARNING)
        self.thread = thread
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and str(record.msg).startswith("Executing"):
            self.lines.append(record.getMessage())


class Probe:
    """``await probe(label, call, *args, **kwargs)``: run one API call (awaited if it returns an
    awaitable, at most ``bound`` s) and note under ``label`` the slow callbacks logged
    meanwhile, and a call that did not return in time. ``want=`` checks the result, ``raises=``
    the error class. Never raises itself (apart from bugs), so that one run reports every call."""

    def __init__(self, slow: SlowCallbacks) -> None:
        self.slow = slow
        self.blocked: dict[str, list[str]] = {}
        self.wrong: dict[str, str] = {}

    async def __call__(self, label: str, call: Callable[..., Any], *args: Any,
                       want: Any = ..., raises: type[BaseException] | None = None,
                       bound: float = SLOW, **kwargs: Any) -> Any:
        seen = len(self.slow.lines)
        result: Any = None
        try:
            result = call(*args, **kwargs)
            if inspect.isawaitable(result):
                waiting = asyncio.ensure_future(result)
                await asyncio.wait([waiting], timeout=bound)
                if not waiting.done():
                    waiting.cancel()
                    self.wrong[label] = f"did not return within {bound} s"
                    await asyncio.wait([waiting], timeout=bound)
                    return None
                result = waiting.result()
        except Exception as exc:
            if raises is None or not isinstance(exc, raises):
                self.wrong[label] = f"raised {exc!r}"
        else:
            if raises is not None:
                self.wrong[label] = f"returned {result!r}, expected {raises.__name__}"
            elif want is not ... and result != want:
                self.wrong[label] = f"returned {result!r}, expected {want!r}"
        # End this task's step, so that a call that held the loop is logged by now.
        await asyncio.sleep(0)
        lines = self.slow.lines[seen:]
        if lines:
            self.blocked.setdefault(label, []).extend(lines)
        return result

    def report(self) -> str:
        lines = [f"blocked the loop: {label}: {' | '.join(found)}"
                 for label, found in self.blocked.items()]
        lines += [f"wrong: {label}: {what}" for label, what in self.wrong.items()]
        return "\n".join(lines)


class Later:
    """Run callables in a plain thread, each LATER_S after it is given; errors are kept."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def __call__(self, action: Callable[[], Any]) -> threading.Event:
        done = threading.Event()

        def run() -> None:
            try:
                threading.Event().wait(LATER_S)  # the other side acts after the wait began
                action()
            except BaseException as exc:  # noqa: B036 - reported by the test
                self.errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=run, name="test-later")
        self.threads.append(thread)
        thread.start()
        return done

    def join(self) -> None:
        for thread in self.threads:
            thread.join(SLOW)
        assert not [t for t in self.threads if t.is_alive()], "a helper thread did not end"
        assert not self.errors, f"a helper thread failed: {self.errors!r}"


def mute_control_record(port: int) -> NodeRecord:
    """A directory record whose control endpoint is ``port`` (a TCP port that never speaks
    ZeroMQ)."""
    return NodeRecord(f"mute-{secrets.token_hex(4)}", secrets.token_hex(8), "raw-host", 1,
                      "127.0.0.1", (Endpoint(EndpointKind.CONTROL, "control", port),), 1)


def test_no_aio_node_api_blocks_the_loop(name) -> None:
    svc, stream, pipe, late_pipe, task, own_svc = (
        name("svc"), name("ticks"), name("jobs"), name("late"), name("work"), name("own"))
    helper = zf.Node(name("helper"))  # sync; the other side of each wait, run from threads

    @helper.reply(svc)
    def echo(body: Any) -> Any:
        return body

    @helper.task(task)
    def double(body: int) -> int:
        return body * 2

    later = Later()
    mute = socket.create_server(("127.0.0.1", 0))  # accepts TCP (the backlog), never speaks ZMTP
    helper_got: list[Any] = []
    sub_done = threading.Event()

    def helper_subscribes() -> None:
        with helper.subscribe(stream) as sub:
            helper_got.append(sub.recv(timeout=SLOW))
        sub_done.set()

    async def main() -> Probe:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = THRESHOLD_S
        slow = SlowCallbacks(threading.get_ident())
        logging.getLogger("asyncio").addHandler(slow)
        probe = Probe(slow)
        a = AioNode(name("a"), tasks=zf.TaskConfig(queue_limit=1))
        b = AioNode(name("b"))

        @b.reply(own_svc)
        async def served_in_this_loop(body: Any) -> Any:
            await asyncio.sleep(0)
            return {"served": body}

        try:
            await probe("start", a.start)
            await probe("start", b.start)

            # --- the directory ---
            later(helper.serve_in_background)
            record = await probe("wait_for_node", a.wait_for_node, helper.name, SLOW)
            assert record is not None, probe.report()
            later(lambda: helper.puller(late_pipe))
            await probe("wait_for_endpoint", a.wait_for_endpoint, EndpointKind.PIPELINE,
                        late_pipe, SLOW, want=1)
            nodes = await probe("nodes", a.nodes)
            assert helper.name in {r.name for r in nodes}

            # --- control ---
            answer = await probe("ping", a.ping, helper.name, SLOW)
            assert answer is not None and answer["node"] == helper.name, probe.report()
            await probe("info", a.info, helper.name, SLOW)
            await probe("stats", a.stats, helper.name, SLOW)
            silent = mute_control_record(mute.getsockname()[1])
            a.directory.put(silent)
            await probe("ping (silent control port)", a.ping, silent.name, 0.5,
                        raises=zf.FabricTimeoutError, bound=5.0)
            await probe("ping (unknown node)", a.ping, name("nobody"), 0.3,
                        raises=zf.NodeNotFoundError, bound=5.0)

            # --- request/reply (the helper's service; b's, served by run() in this loop) ---
            await probe("request", a.request, svc, 21, SLOW, want=21)
            serving = asyncio.create_task(b.run(handle_signals=False))
            await probe("request (served here)", a.request, own_svc, 1, SLOW, retries=1,
                        want={"served": 1})
            requester = await probe("requester", a.requester, svc)
            await probe("requester.request", requester.request, [1, 2], SLOW, want=[1, 2])
            await probe("requester.close", requester.close)
            await probe("request (no provider)", a.request, name("nobody"), 1, 0.3,
                        raises=zf.NoProviderError, bound=5.0)

            # --- publish/subscribe ---
            publisher = await probe("publisher", a.publisher, stream)
            sub = await probe("subscribe", b.subscribe, stream)
            later(helper_subscribes)
            await probe("wait_subscribers", publisher.wait_subscribers, 2, SLOW, want=2)
            await probe("publisher.send", publisher.send, "t", {"x": 1})
            await probe("recv", sub.recv, SLOW, want=("t", {"x": 1}))
            await probe("publisher.send", publisher.send, "t", {"x": 2})
            message = await probe("recv_message", sub.recv_message, SLOW)
            assert message is not None and message.body == {"x": 2}, probe.report()
            await probe("recv (timeout)", sub.recv, 0.1, raises=zf.FabricTimeoutError)
            await probe("subscription.close", sub.close)

            # --- push/pull ---
            puller = await probe("puller", b.puller, pipe)
            pusher = await probe("pusher", a.pusher, pipe)
            await probe("pusher.wait_ready", pusher.wait_ready, SLOW, want=True)
            await probe("pusher.send", pusher.send, {"i": 1}, SLOW)
            await probe("puller.recv", puller.recv, SLOW, want={"i": 1})
            await probe("puller.recv (timeout)", puller.recv, 0.1, raises=zf.FabricTimeoutError)
            await probe("pusher.send", pusher.send, {"i": 2}, SLOW)
            await probe("async for body in puller", anext, aiter(puller), want={"i": 2})

            # --- reliable tasks (queue_limit=1: the second submit waits for the first) ---
            first = await probe("submit", a.submit, task, 1)
            second = await probe("submit (queue full)", a.submit, task, 2, timeout=SLOW)
            await probe("task result", lambda: first, want=2)
            await probe("task result", lambda: second, want=4)
            await probe("wait_tasks", a.wait_tasks, SLOW, want=True)
            await probe("task_stats", a.task_stats)
            await probe("refused_peers", a.refused_peers)

            # --- serving ends ---
            await probe("stop", b.stop)
            await probe("run ends", lambda: serving)

            # --- closing ---
            await probe("close", a.close)
            await probe("close", b.close)
        finally:
            logging.getLogger("asyncio").removeHandler(slow)
            await asyncio.wait_for(a.close(), SLOW)
            await asyncio.wait_for(b.close(), SLOW)
        return probe

    try:
        probe = asyncio.run(asyncio.wait_for(main(), 6 * SLOW))
        assert not probe.blocked and not probe.wrong, f"\n{probe.report()}"
        assert sub_done.wait(SLOW) and helper_got == [("t", {"x": 1})]
    finally:
        later.join()
        helper.close()
        mute.close()
