"""Control calls (``ping``, ``info``, ``stats``; the CLI's ``ping``, ``stats``, ``top``) honour
their timeout whatever the peer does, and say why they failed:

- a peer whose control port accepts TCP but never speaks ZeroMQ, or a port nobody listens on:
  FabricTimeoutError at the timeout (CLI exit 4), never a hang (the request is never sent with a
  blocking send);
- a secured peer that refuses our key: AuthorizationError at once, from the handshake that the
  call watches (CLI exit 7), not a timeout;
- a node closed while a call waits: the call ends at once with ClosedError;
- ``top`` ends on the first Ctrl-C, also with a silent peer in the fabric.

Silent peers are hand-made directory records (in process) or hand-made mDNS records pinned to
127.0.0.1 (for CLI processes), whose control port is a plain TCP socket of this test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import zmqfabric as zf
import zmqfabric.aio
from tests.helpers import forged_service_info, loopback_zeroconf, unique, wait_until
from tests.procs import Child, ProcessGroup
from zmqfabric.core.records import (
    Endpoint,
    EndpointKind,
    NodeRecord,
    encode_txt,
    instance_name,
)
from zmqfabric.security import keys

#: Bound for waits that should succeed (discovery, processes).
WAIT = 20.0
#: How much later than its timeout a timed-out call may return (s): scheduling on a loaded host.
SLACK = 1.0
#: How soon a refused handshake must end a call (s), the promise under test.
REFUSED_WITHIN = 1.0
#: How often a test looks at a child's stderr for a line (s).
POLL_S = 0.01
#: The CLI's exit codes (zmqfabric --help).
EXIT_TIMEOUT, EXIT_REFUSED, EXIT_INTERRUPTED = 4, 7, 130

FLAVOURS = ["sync", "asyncio"]


# --- silent peers -------------------------------------------------------------------------------


@contextlib.contextmanager
def silent_port(kind: str) -> Iterator[int]:
    """A TCP port of 127.0.0.1 that takes connections (the kernel's backlog accepts them) and
    never answers (``"silent"``), or one that nobody listens on (``"closed"``)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        if kind == "closed":
            server.close()
        yield port
    finally:
        server.close()


def silent_record(port: int) -> NodeRecord:
    """The record of a node whose control endpoint is ``port``."""
    node_id = secrets.token_hex(8)
    return NodeRecord(unique("silent"), node_id, "silent-host", 1, "127.0.0.1",
                      (Endpoint(EndpointKind.CONTROL, "control", port),), 1)


@contextlib.contextmanager
def advertised(record: NodeRecord) -> Iterator[None]:
    """``record`` advertised with mDNS on 127.0.0.1 (for other processes to find)."""
    control = record.control
    assert control is not None
    zc = loopback_zeroconf()
    info = forged_service_info(instance_name(record.name, record.node_id), record.node_id,
                               encode_txt(record), control.port)
    zc.register_service(info, cooperating_responders=True)
    try:
        yield
    finally:
        zc.unregister_service(info)
        zc.close()


Ask = Callable[[str, str, float], Any]


@contextlib.contextmanager
def caller(flavour: str, prefix: str, **kwargs: Any) -> Iterator[tuple[Any, Ask]]:
    """A started node of ``flavour`` and ``ask(op, target, timeout)``, which calls
    ``node.<op>(target, timeout=timeout)``: on a sync node in this thread; on an asyncio node in
    the loop it runs in (a thread of this test), while this thread waits for the result."""
    if flavour == "sync":
        with zf.Node(unique(prefix), **kwargs) as node:
            yield node, lambda op, target, timeout: getattr(node, op)(target, timeout=timeout)
        return
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop")
    thread.start()

    def on_loop(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(WAIT)

    node = zmqfabric.aio.Node(unique(prefix), **kwargs)
    try:
        on_loop(node.start())
        yield node, lambda op, target, timeout: on_loop(getattr(node, op)(target, timeout=timeout))
    finally:
        try:
            on_loop(node.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(WAIT)
            loop.close()


# --- in one process -----------------------------------------------------------------------------


@pytest.mark.parametrize("port_kind", ["silent", "closed"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_control_port_that_never_answers_times_out(flavour: str, port_kind: str) -> None:
    timeout = 0.5
    with silent_port(port_kind) as port, caller(flavour, "asker") as (node, ask):
        for op in ("ping", "info", "stats"):
            # A record of its own for each call: the asker's liveness buries a node whose port
            # is closed, about a second after it was listed (its first probe waits 1 s, the
            # initial timeout; the port check that follows is refused), and this test is about
            # each call's own timeout.
            target = silent_record(port)
            node.directory.put(target)
            start = time.monotonic()
            with pytest.raises(zf.FabricTimeoutError) as err:
                ask(op, target.name, timeout)
            elapsed = time.monotonic() - start
            assert timeout - 0.05 <= elapsed < timeout + SLACK, f"{op}: {elapsed:.2f} s"
            assert err.value.timeout == timeout and target.name in str(err.value)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_unknown_node_is_not_found_at_the_timeout(flavour: str) -> None:
    with caller(flavour, "asker") as (_, ask):
        start = time.monotonic()
        with pytest.raises(zf.NodeNotFoundError):
            ask("ping", unique("nobody"), 0.3)
        assert 0.25 <= time.monotonic() - start < 0.3 + SLACK


@pytest.fixture
def refusing(tmp_path: Path) -> Iterator[tuple[zf.Node, Path, Path]]:
    """A secured node (its own keys, an empty allow-list), plus two client key directories:
    ``stranger`` allows the node's key (so it sees the node) but is not allowed by it;
    ``friend`` and the node allow each other."""
    server_dir, stranger, friend = tmp_path / "server", tmp_path / "stranger", tmp_path / "friend"
    server_key = keys.generate(server_dir)
    keys.generate(stranger)
    friend_key = keys.generate(friend)
    keys.allow(stranger, server_key, "server")
    keys.allow(friend, server_key, "server")
    keys.allow(server_dir, friend_key, "friend")
    with zf.Node(unique("secured"), keys=server_dir) as server:
        yield server, stranger, friend


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_peer_that_refuses_our_key_fails_at_once(refusing, flavour: str) -> None:
    server, stranger, friend = refusing
    with caller(flavour, "friend", keys=friend) as (_, ask):
        assert ask("ping", server.name, WAIT)["node"] == server.name
    with caller(flavour, "stranger", keys=stranger) as (node, ask):
        # The server cannot prove its record to a node it refuses: it is never listed, only
        # refused (time the refusal only, not discovery).
        wait_until(lambda: any(r.name == server.name for r, _ in node.refused_peers()), WAIT,
                   "the server's refusal")
        assert node.directory.get(server.name) is None
        for op in ("ping", "stats"):
            start = time.monotonic()
            with pytest.raises(zf.AuthorizationError) as err:
                ask(op, server.name, WAIT)
            elapsed = time.monotonic() - start
            assert elapsed < REFUSED_WITHIN, f"{op} refused after {elapsed:.2f} s, not at once"
            assert server.name in str(err.value) and "keys allow" in str(err.value)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_peer_whose_key_we_do_not_allow_fails_at_once(tmp_path: Path, flavour: str) -> None:
    """Our allow-list lacks the server's key: no answer can change that, so the call ends at
    once with AuthorizationError saying so (before: at the timeout, exit 4)."""
    server_dir, wary = tmp_path / "server", tmp_path / "wary"
    keys.generate(server_dir)
    wary_key = keys.generate(wary)
    keys.allow(server_dir, wary_key, "wary")  # the server would talk to us; we refuse it
    with zf.Node(unique("secured"), keys=server_dir) as server, \
            caller(flavour, "wary", keys=wary) as (node, ask):
        wait_until(lambda: any(r.name == server.name for r, _ in node.refused_peers()), WAIT,
                   "our refusal of the server")
        start = time.monotonic()
        with pytest.raises(zf.AuthorizationError) as err:
            ask("ping", server.name, WAIT)
        elapsed = time.monotonic() - start
        assert elapsed < REFUSED_WITHIN, f"refused after {elapsed:.2f} s, not at once"
        assert err.value.ours is not None and "allow-list" in str(err.value)
        assert "this node refuses" in str(err.value)


def test_closing_the_node_ends_a_call_in_flight() -> None:
    """A call waiting on a silent peer from another thread ends with ClosedError as soon as its
    node closes, and the close does not wait for the call's timeout."""
    outcome: list[BaseException | Any] = []
    with silent_port("silent") as port:
        node = zf.Node(unique("closing")).start()
        target = silent_record(port)
        node.directory.put(target)
        started = threading.Event()

        def ask() -> None:
            started.set()
            try:
                outcome.append(node.ping(target.name, timeout=60))
            except BaseException as exc:  # noqa: B036 - checked below
                outcome.append(exc)

        thread = threading.Thread(target=ask, name="test-asker")
        thread.start()
        assert started.wait(WAIT)
        start = time.monotonic()
        node.close()
        thread.join(WAIT)
        elapsed = time.monotonic() - start
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], zf.ClosedError), outcome
    assert elapsed < 5.0, f"closing took {elapsed:.2f} s with a call in flight"


def test_closing_an_asyncio_node_ends_its_calls_in_flight() -> None:
    """The same in one loop: a coroutine awaiting a call on a silent peer gets ClosedError when
    the node closes, and the close takes no longer than without the call."""

    async def main() -> tuple[list[Any], float]:
        with silent_port("silent") as port:
            node = zmqfabric.aio.Node(unique("closing"))
            await node.start()
            target = silent_record(port)
            node.directory.put(target)

            async def ask() -> Any:
                try:
                    return await node.ping(target.name, timeout=60)
                except zf.FabricError as exc:
                    return exc

            calls = [asyncio.create_task(ask()) for _ in range(3)]
            await asyncio.sleep(0)  # each call is waiting now
            start = time.monotonic()
            await node.close()
            elapsed = time.monotonic() - start
            return await asyncio.wait_for(asyncio.gather(*calls), WAIT), elapsed

    outcomes, elapsed = asyncio.run(asyncio.wait_for(main(), 2 * WAIT))
    assert all(isinstance(o, zf.ClosedError) for o in outcomes), outcomes
    assert elapsed < 5.0, f"closing took {elapsed:.2f} s with calls in flight"


# --- the CLI, in processes of its own -----------------------------------------------------------


def cli_run(procs: ProcessGroup, *args: str) -> tuple[int, float, str]:
    """Run ``zmqfabric ARGS`` to its end (at most WAIT s): (exit code, seconds it took from
    the start of the process, stderr)."""
    start = time.monotonic()
    child = procs.cli(*args)
    code = child.wait(WAIT)
    elapsed = time.monotonic() - start
    child.stop()
    return code, elapsed, child.err_tail()


def test_cli_refused_by_a_secured_node_exits_7_at_once(refusing, procs: ProcessGroup) -> None:
    """A CLI whose key the node does not allow: exit 7 (refused) as soon as the node refuses
    to prove its record (start-up, discovery and one handshake), not at --timeout; one the node
    allows: exit 0."""
    server, stranger, friend = refusing
    code, _, err = cli_run(procs, "--keys", str(friend), "--timeout", str(WAIT), "ping",
                           server.name)
    assert code == 0, err
    for command in ("ping", "stats"):
        code, elapsed, err = cli_run(procs, "--keys", str(stranger), "--timeout", str(WAIT),
                                     command, server.name)
        assert code == EXIT_REFUSED, err
        assert "refused" in err and "keys allow" in err, err
        assert elapsed < WAIT / 4, f"{command}: refused after {elapsed:.2f} s, not at once"


def wait_for_line(child: Child, text: str, timeout: float) -> float:
    """The time ``text`` appeared in ``child``'s stderr (read as it comes; looked at every
    POLL_S)."""
    deadline = time.monotonic() + timeout
    while not any(text in line for line in list(child.stderr)):
        assert child.proc.poll() is None, f"exited before {text!r}:\n{child.err_tail()}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(POLL_S)
    return time.monotonic()


@pytest.mark.parametrize("port_kind", ["silent", "closed"])
def test_cli_against_a_silent_control_port_exits_4_at_the_timeout(
    procs: ProcessGroup, port_kind: str
) -> None:
    timeout = 4.0  # finding the node by mDNS takes up to a second of it
    with silent_port(port_kind) as port:
        target = silent_record(port)
        with advertised(target):
            start = time.monotonic()  # both commands at once: each waits its own timeout
            children = {command: procs.cli("--timeout", str(timeout), command, target.name)
                        for command in ("ping", "stats")}
            ended = exit_times(children, start)
            for command, child in children.items():
                code, elapsed = ended[command]
                child.stop()
                err = child.err_tail()
                assert code == EXIT_TIMEOUT, err
                assert "did not answer" in err, err
                # At the timeout: not before it, and not a hang (start-up is the rest).
                assert timeout <= elapsed < timeout + 5.0, f"{command}: {elapsed:.2f} s"


def exit_times(children: dict[str, Child], start: float) -> dict[str, tuple[int, float]]:
    """Each child's exit code and the seconds from ``start`` to its exit (seen within POLL_S),
    waiting at most WAIT for all of them."""
    ended: dict[str, tuple[int, float]] = {}
    deadline = start + WAIT
    while len(ended) < len(children):
        for key, child in children.items():
            code = child.proc.poll()
            if key not in ended and code is not None:
                ended[key] = (code, time.monotonic() - start)
        assert time.monotonic() < deadline or len(ended) == len(children), (
            f"still running after {WAIT} s: {sorted(set(children) - set(ended))}")
        time.sleep(POLL_S)
    return ended


def test_top_ends_on_the_first_ctrl_c_with_a_silent_node(
    procs: ProcessGroup, make_node: Callable[..., zf.Node]
) -> None:
    """``top`` with a silent node among its peers: each refresh still comes (the silent one shows
    an error), and one SIGINT ends it at once, also while it waits for the silent node."""
    live = make_node("live")
    with silent_port("silent") as port:
        target = silent_record(port)
        with advertised(target):
            child = procs.cli("--json", "top", "--interval", "0.2")
            seen: set[str] = set()
            while live.name not in seen:  # the silent node is never listed: it cannot prove
                seen.add(_json_node(child.readline(WAIT)))  # its record
            child.signal(signal.SIGINT)
            interrupted = time.monotonic()
            code = child.wait(WAIT)
            elapsed = time.monotonic() - interrupted
            child.stop()
    assert code == EXIT_INTERRUPTED, child.err_tail()
    assert elapsed < 3.0, f"top took {elapsed:.2f} s to end after Ctrl-C"


def _json_node(line: str) -> str:
    return str(json.loads(line).get("node"))
