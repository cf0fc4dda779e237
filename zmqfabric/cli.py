"""The ``zmqfabric`` command line (click). Thin: every command is a few calls on a :class:`Node`.

The group callback builds one frozen :class:`CliConfig` into ``ctx.obj``; commands receive it with
``@pass_config``. Options also come from the environment (``ZMQFABRIC_INTERFACE``,
``ZMQFABRIC_TIMEOUT``, ``ZMQFABRIC_JSON``...). Errors become one ``error: ...`` line on stderr
and the exit codes of :class:`ExitCode`; nothing here prints a traceback for a fabric error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import importlib
import inspect
import json
import logging
import os
import queue
import signal
import sys
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Iterator, NoReturn, Sequence

import click
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import aio
from .config import INTERFACE_ENV, Scope
from .core.records import NodeRecord, validate_endpoint_name, validate_node_name
from .directory import DirectoryEvent
from .errors import (
    FabricError,
    FabricTimeoutError,
    InvalidNameError,
    LocalProtocolError,
    NameConflictError,
    NodeNotFoundError,
    NoProviderError,
    RemoteError,
    RemoteProtocolError,
)
from . import __version__
from .node import Node
from .nodebase import NodeBase
from .patterns.pubsub import Publisher

#: Default for every bounded wait of the CLI (discovery, replies, subscribers).
DEFAULT_TIMEOUT_S = 5.0
#: How long `ls` listens for nodes answering discovery. An observer's first mDNS query (QU) is
#: answered by unicast, which on a shared loopback port can reach another process; the browser's
#: second query, one second later, is answered by multicast. 1.5 s covers both rounds.
LS_LISTEN_S = 1.5
#: After a subscriber's handshake, its SUBSCRIBE frame still has to reach the publisher.
SUBSCRIBE_SETTLE_S = 0.05
#: Loops that wait wake at least this often, so every wait is bounded and interruptible.
WAIT_SLICE_S = 1.0


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    TIMEOUT = 4
    REMOTE = 5
    CONFLICT = 6
    INTERRUPTED = 130
    TERMINATED = 143


#: Checked in order: the first matching class gives the exit code.
_EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (NoProviderError, ExitCode.NOT_FOUND),
    (NodeNotFoundError, ExitCode.NOT_FOUND),
    (FabricTimeoutError, ExitCode.TIMEOUT),
    (RemoteError, ExitCode.REMOTE),
    (RemoteProtocolError, ExitCode.REMOTE),
    (NameConflictError, ExitCode.CONFLICT),
    (LocalProtocolError, ExitCode.USAGE),
    (FabricError, ExitCode.FAILURE),
)

EPILOG = """\b
Exit codes:
  0    success
  1    other failure (e.g. discovery cannot start; the demo failed)
  2    usage error or bad input (invalid JSON, invalid name, unknown option)
  3    not found: no node of that name, no provider of that service/pipeline
  4    timeout: providers exist but did not answer; --count not reached
  5    remote error: the handler raised, or the peer broke the protocol
  6    node name conflict
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM); `run` exits 0 on SIGTERM

\b
Bodies are JSON: an argument, or one JSON value per stdin line when the argument is absent.
Options can be set from the environment: ZMQFABRIC_INTERFACE, ZMQFABRIC_TIMEOUT, ZMQFABRIC_JSON.
"""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (closing nodes on the way out)."""


class BadInput(click.ClickException):
    """Input the user gave is unusable (exit code 2)."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True, slots=True)
class Body:
    """A JSON value given on the command line (distinguishes ``null`` from "no argument")."""

    value: Any


@dataclass(frozen=True, slots=True)
class CliConfig:
    """Everything the global options decide, built once by the group callback."""

    scope: Scope
    json: bool = False
    timeout: float = DEFAULT_TIMEOUT_S
    timeout_given: bool = False
    name: str | None = None

    def node_name(self) -> str:
        return self.name or f"cli-{os.getpid()}"

    def observer(self) -> Node:
        """A node that finds and calls others but is not listed (``advertise=False``)."""
        return Node(self.node_name(), scope=self.scope, advertise=False)

    def member(self) -> Node:
        """A listed node, for commands that offer an endpoint (``pub``, ``pull``)."""
        return Node(self.node_name(), scope=self.scope, advertise=True)

    @property
    def deadline(self) -> float | None:
        """The monotonic deadline of watch-like commands: only an explicit --timeout sets one."""
        return time.monotonic() + self.timeout if self.timeout_given else None


pass_config = click.make_pass_decorator(CliConfig)


# --- parameter types ---------------------------------------------------------------------------

Param = click.Parameter | None
Ctx = click.Context | None


class Seconds(click.ParamType):
    name = "seconds"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not 0 < seconds < 1e6:
            self.fail(f"{value!r} must be more than 0 seconds", param, ctx)
        return seconds


class Interface(click.ParamType):
    """A network interface name, converted to the :class:`Scope` of that interface."""

    name = "iface"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> Scope:
        if isinstance(value, Scope):
            return value
        try:
            return Scope.for_interface(str(value))
        except LocalProtocolError as exc:
            self.fail(str(exc), param, ctx)


class NodeName(click.ParamType):
    name = "name"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> str:
        try:
            return validate_node_name(value)
        except InvalidNameError as exc:
            self.fail(str(exc), param, ctx)


class EndpointName(click.ParamType):
    def __init__(self, what: str) -> None:
        self.what = what
        self.name = what

    def convert(self, value: Any, param: Param, ctx: Ctx) -> str:
        try:
            return validate_endpoint_name(value, self.what)
        except InvalidNameError as exc:
            self.fail(str(exc), param, ctx)


class JsonBody(click.ParamType):
    name = "json"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> Body:
        if isinstance(value, Body):
            return value
        try:
            return Body(json.loads(value))
        except json.JSONDecodeError as exc:
            self.fail(
                f"not valid JSON ({exc.msg} at column {exc.colno}): {_clip(value)}; "
                f"quote it for the shell, e.g. '{{\"x\": 1}}'",
                param,
                ctx,
            )


class ModuleAttr(click.ParamType):
    name = "module:attr"

    def convert(
        self, value: Any, param: Param, ctx: Ctx
    ) -> tuple[str, str]:
        module, sep, attr = str(value).partition(":")
        if not sep or not module or not attr or not all(
            part.isidentifier() for part in (*module.split("."), *attr.split("."))
        ):
            self.fail(f"{value!r} is not MODULE:ATTR (e.g. myapp.nodes:make)", param, ctx)
        return module, attr


# --- the group -------------------------------------------------------------------------------


def _override(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Let subcommands repeat --json/--timeout after their own arguments."""
    if value is None or value is False:
        return
    cfg = ctx.find_object(CliConfig)
    if cfg is None:
        return
    if param.name == "timeout":
        ctx.obj = dataclasses.replace(cfg, timeout=value, timeout_given=True)
    else:
        ctx.obj = dataclasses.replace(cfg, json=True)


def common(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option("--json", "json_", is_flag=True, default=None, expose_value=False,
                           callback=_override,
                           help="JSON lines output (as the global option).")(command)
    return click.option("--timeout", type=Seconds(), expose_value=False, callback=_override,
                        help="Bounded wait in seconds (as the global option).")(command)


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--lan", is_flag=True, help="Join the LAN of the default-route interface.")
@click.option("--interface", "scope", type=Interface(), metavar="IFACE",
              help="Join the LAN of interface IFACE (default: this host only, 127.0.0.1).")
@click.option("--json", "json_", is_flag=True, help="Output JSON lines instead of tables.")
@click.option("--timeout", type=Seconds(), default=DEFAULT_TIMEOUT_S, show_default=True,
              help="Seconds to wait for nodes, providers and replies.")
@click.option("--name", type=NodeName(), help="Node name of this command (default cli-PID).")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.version_option(version=__version__, prog_name="zmqfabric")
@click.pass_context
def cli(ctx: click.Context, lan: bool, scope: Scope | None, json_: bool, timeout: float,
        name: str | None, verbose: int) -> None:
    """zmqfabric: a brokerless messaging fabric. Nodes find each other by name (zeroconf) and
    talk over ZeroMQ. By default everything stays on this host."""
    logging.getLogger().setLevel(max(logging.DEBUG, logging.WARNING - 10 * verbose))
    if lan and scope is not None:
        raise click.UsageError("give either --lan or --interface, not both")
    if lan:
        try:
            scope = Scope.lan()
        except LocalProtocolError as exc:
            raise click.BadParameter(str(exc), param_hint="--lan") from exc
    source = ctx.get_parameter_source("timeout")
    ctx.obj = CliConfig(
        scope=scope or Scope.local(),
        json=json_,
        timeout=timeout,
        timeout_given=source is not None and source is not click.core.ParameterSource.DEFAULT,
        name=name,
    )


# --- commands: directory and control -----------------------------------------------------


@cli.command("ls")
@click.option("--watch", is_flag=True,
              help="Print nodes joining, updating and leaving as it happens.")
@click.option("--count", type=click.IntRange(min=1), help="With --watch: stop after N events.")
@common
@pass_config
def ls_cmd(cfg: CliConfig, watch: bool, count: int | None) -> None:
    """List the nodes of the fabric (name, host, address, endpoints).

    Without --watch, listens LS_LISTEN_S (1.5 s) for answers, or --timeout if given. With
    --watch, runs until Ctrl-C, --count events, or an explicit --timeout."""
    if count is not None and not watch:
        raise click.UsageError("--count needs --watch")
    if watch:
        _watch(cfg, count)
        return
    with cfg.observer() as node:
        time.sleep(cfg.timeout if cfg.timeout_given else LS_LISTEN_S)  # a listening window
        records = [r for r in node.nodes() if r.node_id != node.node_id]
    if cfg.json:
        for record in records:
            _emit(_record_json(record))
        return
    rows = [[r.name, r.host, str(r.pid), r.address, _endpoints_text(r)] for r in records]
    for line in _table(["NAME", "HOST", "PID", "ADDRESS", "ENDPOINTS"], rows):
        click.echo(line)
    if not records:
        click.echo("(no nodes found in this scope)", err=True)


def _watch(cfg: CliConfig, count: int | None) -> None:
    events: queue.Queue[DirectoryEvent] = queue.Queue()
    node = cfg.observer()
    unlisten = node.directory.listen(events.put)  # discovery's thread: only hand over
    deadline = cfg.deadline
    seen = 0
    try:
        with node:
            click.echo(f"watching nodes in {_scope_text(cfg.scope)} (Ctrl-C to stop)", err=True)
            while count is None or seen < count:
                slice_s = _slice(deadline)
                if slice_s is None:
                    return
                try:
                    event = events.get(timeout=slice_s)
                except queue.Empty:
                    continue
                if event.record.node_id == node.node_id:
                    continue
                seen += 1
                now = datetime.datetime.now().isoformat(timespec="milliseconds")
                if cfg.json:
                    _emit({"event": event.change.value, "time": now,
                           "node": _record_json(event.record)})
                else:
                    r = event.record
                    click.echo(f"{now[11:]}  {event.change.value:<7}  {r.name}  {r.address}  "
                               f"{_endpoints_text(r)}")
    finally:
        unlisten()


@cli.command("ping")
@click.argument("node_name", metavar="NODE", type=NodeName())
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True)
@common
@pass_config
def ping_cmd(cfg: CliConfig, node_name: str, count: int) -> None:
    """Ping NODE on its control endpoint and print the round trip time."""
    with cfg.observer() as node:
        node.wait_for_node(node_name, cfg.timeout)
        for _ in range(count):
            start = time.perf_counter()
            answer = node.ping(node_name, timeout=cfg.timeout)
            rtt_ms = (time.perf_counter() - start) * 1000
            if cfg.json:
                _emit({**answer, "rtt_ms": round(rtt_ms, 3)})
            else:
                click.echo(f"{answer['node']} (host {answer['host']}, pid {answer['pid']}, "
                           f"up {answer['uptime_s']:.1f} s): {rtt_ms:.2f} ms")


@cli.command("stats")
@click.argument("node_name", metavar="NODE", type=NodeName())
@common
@pass_config
def stats_cmd(cfg: CliConfig, node_name: str) -> None:
    """Print NODE's endpoints and counters."""
    with cfg.observer() as node:
        answer = node.stats(node_name, timeout=cfg.timeout)
    if cfg.json:
        _emit(answer)
        return
    click.echo(f"{answer['node']} (host {answer['host']}, pid {answer['pid']}, "
               f"up {answer['uptime_s']:.1f} s) at {answer.get('address', '?')}")
    endpoints = [[e["kind"], e["name"], str(e["port"])] for e in answer.get("endpoints", [])]
    for line in _table(["KIND", "ENDPOINT", "PORT"], endpoints):
        click.echo(line)
    counters = [[k, str(v)] for k, v in answer.get("counters", {}).items()]
    for line in _table(["COUNTER", "VALUE"], counters):
        click.echo(line)


# --- commands: patterns ----------------------------------------------------------------------


@cli.command("req")
@click.argument("service", type=EndpointName("service"))
@click.argument("body", metavar="[JSON]", required=False, type=JsonBody())
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
              help="Further attempts (to the next provider) after a timeout.")
@common
@pass_config
def req_cmd(cfg: CliConfig, service: str, body: Body | None, retries: int) -> None:
    """Call SERVICE with the JSON body and print the reply (one per stdin line without JSON)."""
    with cfg.observer() as node:
        for value in _bodies(body):
            reply = node.request(service, value, timeout=cfg.timeout, retries=retries)
            if cfg.json:
                _emit(reply)
            else:
                click.echo(_dumps(reply, indent=2))


@cli.command("pub")
@click.argument("stream", type=EndpointName("stream"))
@click.argument("topic")
@click.argument("body", metavar="[JSON]", required=False, type=JsonBody())
@click.option("--wait-subscribers", type=click.IntRange(min=0), default=1, show_default=True,
              help="Before publishing, wait up to --timeout for N subscribers to connect.")
@common
@pass_config
def pub_cmd(cfg: CliConfig, stream: str, topic: str, body: Body | None,
            wait_subscribers: int) -> None:
    """Publish JSON bodies on STREAM under TOPIC (one per stdin line without JSON).

    Pub/sub drops messages sent before a subscriber is connected, so this first waits for
    --wait-subscribers connections (default 1) for at most --timeout, then publishes anyway
    with a warning. Publishing goes out as node cli-PID (or --name), listed while it runs."""
    with cfg.member() as node:
        publisher = node.publisher(stream)
        subscribers = _wait_subscribers(publisher, wait_subscribers, cfg.timeout)
        if subscribers < wait_subscribers:
            click.echo(f"warning: {subscribers} of {wait_subscribers} subscriber(s) connected to "
                       f"stream {stream!r} within {cfg.timeout:g} s; publishing anyway "
                       "(messages nobody is subscribed to are dropped)", err=True)
        sent = 0
        for value in _bodies(body):
            publisher.send(topic, value)
            sent += 1
    if cfg.json:
        _emit({"stream": stream, "topic": topic, "sent": sent, "subscribers": subscribers})
    else:
        click.echo(f"published {_plural(sent, 'message')} on stream {stream!r} (topic {topic!r}, "
                   f"{_plural(subscribers, 'subscriber')} connected)")


@cli.command("sub")
@click.argument("stream", type=EndpointName("stream"))
@click.argument("topics", nargs=-1)
@click.option("--count", type=click.IntRange(min=1), help="Exit after N messages.")
@common
@pass_config
def sub_cmd(cfg: CliConfig, stream: str, topics: tuple[str, ...], count: int | None) -> None:
    """Print messages of STREAM whose topic starts with one of TOPICS (default: all).

    Runs until Ctrl-C, --count messages, or an explicit --timeout (exit 4 if --count was not
    reached by then)."""
    with cfg.observer() as node:
        sub = node.subscribe(stream, list(topics) or None)
        which = ", ".join(repr(t) for t in topics) if topics else "all topics"
        click.echo(f"subscribed to stream {stream!r} ({which}); Ctrl-C to stop", err=True)
        _receive(cfg, f"stream {stream!r}", sub.recv_message, count)


@cli.command("push")
@click.argument("pipeline", type=EndpointName("pipeline"))
@click.argument("body", metavar="[JSON]", required=False, type=JsonBody())
@common
@pass_config
def push_cmd(cfg: CliConfig, pipeline: str, body: Body | None) -> None:
    """Send JSON bodies into PIPELINE, round robin over its pullers (stdin lines without JSON)."""
    sent = 0
    with cfg.observer() as node:
        pusher = node.pusher(pipeline)
        if not pusher.wait_ready(cfg.timeout):
            raise NoProviderError("pipeline", pipeline, cfg.timeout)
        for value in _bodies(body):
            pusher.send(value, timeout=cfg.timeout)
            sent += 1
    if cfg.json:
        _emit({"pipeline": pipeline, "sent": sent})
    else:
        click.echo(f"pushed {_plural(sent, 'message')} into pipeline {pipeline!r}")


@cli.command("pull")
@click.argument("pipeline", type=EndpointName("pipeline"))
@click.option("--count", type=click.IntRange(min=1), help="Exit after N messages.")
@common
@pass_config
def pull_cmd(cfg: CliConfig, pipeline: str, count: int | None) -> None:
    """Take messages from PIPELINE and print them. Offers the pipeline as node cli-PID (or
    --name). Runs until Ctrl-C, --count messages, or an explicit --timeout."""
    with cfg.member() as node:
        puller = node.puller(pipeline)
        click.echo(f"pulling from pipeline {pipeline!r} as node {node.name}; Ctrl-C to stop",
                   err=True)
        _receive(cfg, f"pipeline {pipeline!r}", puller.recv_message, count)


def _receive(cfg: CliConfig, what: str, recv: Callable[[float], Any], count: int | None) -> None:
    deadline = cfg.deadline
    received = 0
    while count is None or received < count:
        slice_s = _slice(deadline)
        if slice_s is None:
            break
        message = recv(slice_s)
        if message is None:
            continue
        received += 1
        if cfg.json:
            row = {"topic": message.topic} if message.topic is not None else {}
            _emit({**row, "body": message.body, "id": message.msg_id, "ts": message.timestamp})
        elif message.topic is not None:
            click.echo(f"{message.topic}  {_dumps(message.body)}")
        else:
            click.echo(_dumps(message.body))
    if count is not None and received < count:
        raise FabricTimeoutError(f"received {received} of {count} messages on {what} within "
                                 f"{cfg.timeout:g} s", timeout=cfg.timeout)


def _wait_subscribers(publisher: Publisher, wanted: int, timeout: float) -> int:
    """Wait up to ``timeout`` s for ``wanted`` subscribers of ``publisher``; return how many
    connected. Uses ``Publisher.wait_subscribers`` when the library has it."""
    if wanted <= 0:
        return 0
    wait = getattr(publisher, "wait_subscribers", None)
    connected = int(wait(wanted, timeout)) if wait else _count_handshakes(publisher, wanted,
                                                                           timeout)
    if connected >= wanted:
        time.sleep(SUBSCRIBE_SETTLE_S)  # the SUBSCRIBE frame follows the handshake
    return connected


def _count_handshakes(publisher: Publisher, wanted: int, timeout: float) -> int:
    """Stand-in for ``Publisher.wait_subscribers`` (not in the library yet): a socket monitor
    on the publisher's socket. A subscriber that connected before the monitor started is not
    counted, so this errs towards waiting."""
    sock: zmq.Socket[bytes] = publisher._sock  # noqa: SLF001 - no public API for this yet
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    connected = 0
    try:
        deadline = time.monotonic() + timeout
        while connected < wanted and (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(max(1, int(min(left, WAIT_SLICE_S) * 1000))):
                continue
            event = recv_monitor_message(monitor)["event"]
            connected = max(0, connected + (1 if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else -1))
    finally:
        sock.disable_monitor()
        monitor.close(0)
    return connected


# --- run ---------------------------------------------------------------------------------------


@cli.command("run")
@click.argument("target", metavar="MODULE:ATTR", type=ModuleAttr())
@click.option("--name", "run_name", type=NodeName(),
              help="Node name: ATTR must then be a function make(name) -> Node.")
@common
@pass_config
def run_cmd(cfg: CliConfig, target: tuple[str, str], run_name: str | None) -> int:
    """Serve the node MODULE:ATTR until Ctrl-C or SIGTERM.

    ATTR is a zmqfabric Node, or a function returning one; with --name it is called as
    ATTR(name=NAME), so one definition runs as several named instances. Prints a `ready` line
    once the node is on the fabric."""
    node = _load_node(target, run_name or cfg.name, cfg.scope)
    if node.config.scope != cfg.scope:
        click.echo(f"note: node {node.name!r} sets its own scope {_scope_text(node.config.scope)}",
                   err=True)
    stopped_by: list[int] = []

    def stop(signum: int) -> None:
        stopped_by.append(signum)
        node.stop()

    if isinstance(node, aio.Node):
        asyncio.run(_run_async(cfg, node, stop))
    else:
        assert isinstance(node, Node)
        try:
            node.start()
            _announce(cfg, node, "ready")
            restore = {s: signal.signal(s, lambda signum, _frame: stop(signum)) for s in _STOPS}
            try:
                node.run(handle_signals=False)
            finally:
                for signum, old in restore.items():
                    signal.signal(signum, old)
        finally:
            node.close()
    _announce(cfg, node, "stopped")
    return ExitCode.INTERRUPTED if stopped_by[:1] == [signal.SIGINT] else ExitCode.OK


_STOPS = (signal.SIGINT, signal.SIGTERM)


async def _run_async(cfg: CliConfig, node: aio.Node, stop: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    try:
        await node.start()
        _announce(cfg, node, "ready")
        for signum in _STOPS:
            loop.add_signal_handler(signum, stop, signum)
        await node.run(handle_signals=False)
    finally:
        for signum in _STOPS:
            loop.remove_signal_handler(signum)
        await node.close()


def _announce(cfg: CliConfig, node: NodeBase, event: str) -> None:
    record = node.record
    if cfg.json:
        _emit({"event": event, "node": _record_json(record) if event == "ready" else
               {"name": node.name, "id": node.node_id}})
    elif event == "ready":
        click.echo(f"ready: node {node.name} (pid {record.pid}) at {record.address}, offering "
                   f"{_endpoints_text(record) or 'nothing'}; Ctrl-C to stop")
    else:
        click.echo(f"{event}: node {node.name}")


def _load_node(target: tuple[str, str], name: str | None, scope: Scope) -> Node | aio.Node:
    module_name, attr = target
    spec = f"{module_name}:{attr}"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory
    if scope.interface is not None:
        os.environ[INTERFACE_ENV] = scope.interface  # nodes made with the default scope follow
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise BadInput(f"cannot import module {module_name!r}: {exc}") from exc
        raise
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInput(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, (Node, aio.Node)):
        if name is not None and name != obj.name:
            raise BadInput(f"{spec} is the node {obj.name!r}; to run it under other names make "
                           f"{attr} a function: def {attr}(name: str) -> Node")
        return obj
    if not callable(obj):
        raise BadInput(f"{spec} is a {type(obj).__name__}, not a Node or a function returning one")
    kwargs: dict[str, Any] = {} if name is None else {"name": name}
    try:
        params = inspect.signature(obj).parameters
        if "scope" in params:
            kwargs["scope"] = scope
        inspect.signature(obj).bind(**kwargs)
    except (TypeError, ValueError) as exc:
        need = "needs --name" if name is None else "cannot be called with name=..."
        raise BadInput(f"{spec} {need} ({exc})") from exc
    node = obj(**kwargs)
    if not isinstance(node, (Node, aio.Node)):
        raise BadInput(f"{spec}(...) returned a {type(node).__name__}, not a zmqfabric Node")
    return node


# --- demo --------------------------------------------------------------------------------------


@cli.command("demo")
@click.option("--duration", type=Seconds(), default=6.0, show_default=True,
              help="Seconds of traffic (start-up and shutdown add a few).")
@click.option("--workers", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Pipeline workers.")
@common
@pass_config
def demo_cmd(cfg: CliConfig, duration: float, workers: int) -> None:
    """Start a small fabric of real processes on this host and measure it: a service with 2
    providers and a client, a stream with 2 subscribers, and a pipeline producer -> workers ->
    sink. Prints progress each second and a summary; Ctrl-C stops everything."""
    from . import demo

    settings = demo.DemoSettings(duration=duration, workers=workers, scope=cfg.scope)
    summary = demo.run_demo(settings, lambda event: _demo_event(cfg, event))
    if cfg.json:
        _emit({"event": "summary", **summary.as_dict()})
    else:
        for line in demo.summary_lines(summary):
            click.echo(line)
    if not summary.ok:
        raise FabricError("the demo's counts do not match (see the summary above)")


def _demo_event(cfg: CliConfig, event: Any) -> None:
    if cfg.json:
        _emit(event.as_dict())
    else:
        click.echo(event.text())


# --- helpers -----------------------------------------------------------------------------------


def _bodies(body: Body | None) -> Iterator[Any]:
    """The argument's value, or one JSON value per non-blank stdin line."""
    if body is not None:
        yield body.value
        return
    for lineno, line in enumerate(click.get_text_stream("stdin"), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"stdin line {lineno} is not valid JSON ({exc.msg} at column "
                           f"{exc.colno}): {_clip(line.strip())}") from exc


def _slice(deadline: float | None) -> float | None:
    """Seconds for the next bounded wait, or None once ``deadline`` has passed."""
    if deadline is None:
        return WAIT_SLICE_S
    left = deadline - time.monotonic()
    return None if left <= 0 else min(left, WAIT_SLICE_S)


def _record_json(record: NodeRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "id": record.node_id,
        "host": record.host,
        "pid": record.pid,
        "address": record.address,
        "endpoints": [{"kind": e.kind.value, "name": e.name, "port": e.port}
                      for e in record.endpoints],
    }


def _endpoints_text(record: NodeRecord) -> str:
    return " ".join(f"{e.kind.value}:{e.name}" for e in record.endpoints if e.kind.value != "ctl")


def _scope_text(scope: Scope) -> str:
    return "this host (127.0.0.1)" if scope.is_local else f"{scope.interface} ({scope.address})"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in [headers, *rows]]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return data.decode()
        except UnicodeDecodeError:
            return {"$hex": data.hex()}
    return value


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(_jsonable(value), ensure_ascii=False, indent=indent, default=repr)


def _emit(value: Any) -> None:
    click.echo(_dumps(value))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- entry point -------------------------------------------------------------------------------


class _LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _install_interrupts() -> None:
    """First SIGINT/SIGTERM unwinds (closing nodes); a second Ctrl-C forces the exit."""
    hits: dict[int, int] = {}

    def handler(signum: int, _frame: FrameType | None) -> None:
        hits[signum] = hits.get(signum, 0) + 1
        if hits[signum] == 1:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated
        if signum == signal.SIGINT:
            os._exit(ExitCode.INTERRUPTED)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)


def exit_code(exc: BaseException) -> ExitCode:
    """The exit code of a fabric error (see EPILOG)."""
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return ExitCode.FAILURE


def invoke(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (errors reported on stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    _install_interrupts()
    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="zmqfabric",
                          standalone_mode=False, auto_envvar_prefix="ZMQFABRIC")
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, Terminated):
            return ExitCode.TERMINATED
        return ExitCode.INTERRUPTED
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Terminated:
        return ExitCode.TERMINATED
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return ExitCode.USAGE
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except FabricError as exc:
        click.echo(f"error: {exc}", err=True)
        return exit_code(exc)
    return int(result) if isinstance(result, int) else ExitCode.OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point."""
    sys.exit(invoke(argv))
