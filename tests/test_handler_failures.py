"""Failures are logged where they happen, and a handler that asks the process to exit gets it:

- a handler that raises is logged at ERROR on the serving node (type, message, traceback;
  rate-limited per endpoint), and ``zmqfabric run`` prints that with a timestamp to stderr;
- a handler that raises SystemExit or KeyboardInterrupt makes ``run()`` close the node (goodbye
  on discovery, its tasks unacknowledged) and raise it, so ``zmqfabric run`` exits with it and
  the task completes on another worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

import zmqfabric as zf
import zmqfabric.aio
from tests.helpers import unique, wait_until
from tests.procs import ROOT, ProcessGroup
from zmqfabric.constants import LOG_RATE_PER_MINUTE

SLOW = 20.0
#: A CLI log line: local date and time to the millisecond, then the level.
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"

MODULE = """
import sys
import zmqfabric as zf

def divides(name):
    node = zf.Node(name)

    @node.reply({service!r})
    def ratio(body):
        return 1 / body

    return node

def quits(name):
    node = zf.Node(name)

    @node.task({task!r})
    def work(body):
        sys.exit(3)

    return node
"""


@pytest.fixture
def module(tmp_path: Path) -> tuple[str, dict[str, str], str, str]:
    """(module name, env to import it, its service, its task)."""
    service, task = unique("ratio"), unique("quit")
    name = f"zf_failing_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE.format(service=service,
                                                                       task=task)))
    return name, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, service, task


# --- in one process ----------------------------------------------------------------------------


def test_a_failing_handler_is_logged_at_error_with_its_traceback(make_node, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="zmqfabric.patterns.handlers")
    service, task = unique("ratio"), unique("bad-task")
    node = zf.Node(unique("provider"))
    node.reply(service)(lambda body: 1 / body)

    @node.task(task)
    def bad(body: Any) -> None:
        raise ValueError(f"bad task {body}")

    node.start()
    node.serve_in_background()
    try:
        caller = make_node("caller")
        with pytest.raises(zf.RemoteError) as err:
            caller.request(service, 0, timeout=SLOW)
        assert err.value.type == "ZeroDivisionError"
        [record] = [r for r in caplog.records if service in r.getMessage()]
        assert record.levelno == logging.ERROR
        assert "ZeroDivisionError: division by zero" in record.getMessage()
        assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError

        handle = caller.submit(task, 7, max_attempts=1)
        with pytest.raises(zf.TaskFailedError):
            handle.result(SLOW)
        [record] = [r for r in caplog.records if task in r.getMessage()]
        assert "ValueError: bad task 7" in record.getMessage()
        assert f"on task {handle.id} (attempt 1)" in record.getMessage()

        for _ in range(LOG_RATE_PER_MINUTE + 5):  # rate-limited per endpoint
            with pytest.raises(zf.RemoteError):
                caller.request(service, 0, timeout=SLOW)
        lines = [r for r in caplog.records if service in r.getMessage()]
        assert len(lines) == LOG_RATE_PER_MINUTE + 1  # and one "suppressed" line
        assert node.service_stats()[service]["failed"] == LOG_RATE_PER_MINUTE + 6
    finally:
        node.close()


@pytest.mark.parametrize("concurrency", [1, 2], ids=["inline", "pool"])
@pytest.mark.parametrize("exc", [SystemExit(7), KeyboardInterrupt()], ids=["exit", "interrupt"])
def test_a_handler_s_system_exit_closes_the_node_and_run_raises_it(
    concurrency: int, exc: BaseException
) -> None:
    service = unique("fatal")
    node = zf.Node(unique("provider"))

    @node.reply(service, concurrency=concurrency)
    def fatal(body: Any) -> None:
        raise exc

    errors: list[BaseException] = []
    with zf.Node(unique("caller")) as caller:
        def call() -> None:
            try:
                caller.request(service, None, timeout=SLOW)
            except zf.FabricError as error:
                errors.append(error)

        requester = threading.Thread(target=call)
        node.start()
        requester.start()
        try:
            with pytest.raises(type(exc)) as raised:
                node.run(timeout=SLOW, handle_signals=False)
            state = node.state.value  # closed by run() itself
        finally:
            requester.join(SLOW)
            node.close()
        assert raised.value is exc
        assert state == "closed"
        # The caller learned of it at once, as an error reply.
        assert isinstance(errors[0], zf.RemoteError) and errors[0].type == type(exc).__name__
        wait_until(lambda: caller.directory.get(node.name) is None, SLOW, "the goodbye")


def test_an_asyncio_handler_s_system_exit_closes_the_node_and_leaves_the_loop() -> None:
    """``await node.run()`` raises it, and asyncio lets a SystemExit out of ``asyncio.run``
    (as from any task): the process exits."""
    service = unique("fatal")
    seen: dict[str, Any] = {}

    async def main() -> None:
        node = zmqfabric.aio.Node(unique("provider"))

        @node.reply(service)
        async def fatal(body: Any) -> None:
            await asyncio.sleep(0)
            raise SystemExit(5)

        async with zmqfabric.aio.Node(unique("caller")) as caller:
            await node.start()
            call = asyncio.create_task(caller.request(service, None, timeout=SLOW))
            try:
                await node.run(timeout=SLOW, handle_signals=False)
            finally:
                seen["state"] = node.state.value
                [seen["reply"]] = await asyncio.wait_for(
                    asyncio.gather(call, return_exceptions=True), SLOW)

    with pytest.raises(SystemExit) as raised:
        asyncio.run(main())
    assert raised.value.code == 5
    assert seen["state"] == "closed"
    assert isinstance(seen["reply"], zf.RemoteError) and seen["reply"].type == "SystemExit"


# --- zmqfabric run, real processes ------------------------------------------------------------


@pytest.mark.slow
def test_run_prints_a_failing_handler_s_error_and_traceback(
    procs: ProcessGroup, make_node: Callable[..., zf.Node], module: Any
) -> None:
    mod, env, service, _ = module
    name = unique("divides")
    child = procs.cli("run", f"{mod}:divides", "--name", name, env=env)
    child.expect("ready: ", SLOW)
    caller = make_node("caller")
    assert caller.request(service, 4, timeout=SLOW) == 0.25
    with pytest.raises(zf.RemoteError):
        caller.request(service, 0, timeout=SLOW)

    def logged() -> int | None:
        lines = list(child.stderr)
        for i, line in enumerate(lines):
            if re.match(f"{STAMP} error: service {service}: the handler raised "
                        "ZeroDivisionError: division by zero$", line):
                return i + 1  # where the traceback starts (truthy)
        return None

    at = wait_until(logged, SLOW, "the error line", detail=child.err_tail)
    rest = child.stderr[at:]
    assert rest[0] == "Traceback (most recent call last):", child.err_tail()
    assert any("return 1 / body" in line for line in rest), child.err_tail()
    assert "ZeroDivisionError: division by zero" in rest
    child.stop()


@pytest.mark.slow
def test_sys_exit_in_a_task_handler_ends_the_process_and_the_task_completes_elsewhere(
    procs: ProcessGroup, make_node: Callable[..., zf.Node], module: Any
) -> None:
    mod, env, _, task = module
    name = unique("quits")
    child = procs.cli("-v", "run", f"{mod}:quits", "--name", name, env=env)
    child.expect("ready: ", SLOW)
    producer = make_node("producer")
    producer.wait_for_endpoint(zf.EndpointKind.TASK, task, SLOW)
    handle = producer.submit(task, "work")

    assert child.wait(SLOW) == 3, child.err_tail()
    wait_until(lambda: producer.directory.get(name) is None, SLOW, "the node to leave")
    assert any(re.match(f"{STAMP} error: task {task}: the handler raised SystemExit\\(3\\) on "
                        f"task {handle.id} \\(attempt 1\\)", line) for line in child.stderr), (
        child.err_tail())
    assert any(f"node {name} closed" in line for line in child.stderr), child.err_tail()
    assert not handle.done()

    other = zf.Node(unique("other"))
    other.task(task)(lambda body: {"by": "other", "attempt": zf.current_task().attempt})
    with other:
        other.serve_in_background()
        assert handle.result(SLOW) == {"by": "other", "attempt": 2}


@pytest.mark.slow
def test_sys_exit_in_a_handler_of_a_plain_script_exits_the_process(
    procs: ProcessGroup, make_node: Callable[..., zf.Node]
) -> None:
    """Not only under ``zmqfabric run``: ``node.run()`` in a script raises SystemExit too."""
    service, name = unique("bye"), unique("script")
    child = procs.python(f"""
        import zmqfabric as zf
        node = zf.Node({name!r})

        @node.reply({service!r})
        def bye(body):
            raise SystemExit(4)

        node.start()
        print("READY", flush=True)
        node.run()
        print("not reached", flush=True)
    """, timeout=SLOW)
    caller = make_node("caller")
    with pytest.raises(zf.RemoteError):
        caller.request(service, None, timeout=SLOW)
    assert child.wait(SLOW) == 4
    assert "not reached" not in [line for line in iter_lines(child)]
    wait_until(lambda: caller.directory.get(name) is None, SLOW, "the node to leave")


def iter_lines(child: Any) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(child.readline(timeout=1.0))
        except EOFError:
            return lines

