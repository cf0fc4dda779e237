"""Commands that run nodes until stopped: ``run`` (a node of yours), ``device`` (a forwarding
device) and ``demo`` (a measured fabric of real processes). ``run`` and ``device`` stop cleanly
on SIGINT (exit 130) or SIGTERM (exit 0, a service manager's stop)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import re
import signal
import sys
import threading
from typing import Any, Callable

import click

from .. import aio
from ..config import FABRIC_ENV, INTERFACE_ENV
from ..core.records import VIA_KIND, EndpointKind, validate_endpoint_name
from ..errors import FabricError, InvalidNameError
from ..node import Node
from .config import CliConfig, ModuleAttr, NodeName, Seconds, common, pass_config
from .output import (
    BadInput,
    ExitCode,
    emit,
    endpoints_text,
    note,
    plain_lan_warning,
    record_json,
    scope_text,
    warn,
)
from .replicas import replica_names, run_replicas

_STOPS = (signal.SIGINT, signal.SIGTERM)
#: Most processes of one `run --replicas`: one per core is the point; more is a typo.
MAX_REPLICAS = 64


def serve_until_stopped(node: Node) -> int | None:
    """Serve ``node`` (started) until SIGINT/SIGTERM; return the signal that stopped it."""
    stopped_by: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        stopped_by.append(signum)
        node.stop()

    restore = {s: signal.signal(s, stop) for s in _STOPS}
    try:
        node.run(handle_signals=False)
    finally:
        for signum, old in restore.items():
            signal.signal(signum, old)
    return stopped_by[0] if stopped_by else None


def _stop_at_eof(node: Node | aio.Node) -> None:
    """Read stdin to its end (the parent closed it, or died), then stop ``node``. Reads the
    file descriptor itself: a daemon thread blocked in ``sys.stdin``'s buffered reader holds a
    lock that the interpreter's shutdown would wait for."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    node.stop()


def _exit_for(signum: int | None) -> int:
    return ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.OK


# --- run ---------------------------------------------------------------------------------------


@click.command("run")
@click.argument("target", metavar="MODULE:ATTR", type=ModuleAttr())
@click.option("--name", "run_name", type=NodeName(),
              help="Node name: ATTR must then be a function make(name) -> Node.")
@click.option("--replicas", type=click.IntRange(1, MAX_REPLICAS), default=1, show_default=True,
              metavar="N", help="Run N processes of the function ATTR, named NAME-1 .. NAME-N "
                                "(handlers that need more than one core).")
@click.option("--stop-on-stdin-eof", "stdin_eof", is_flag=True, hidden=True,
              help="Stop when stdin closes (a replica whose parent is gone).")
@common
@pass_config
def run_cmd(cfg: CliConfig, target: tuple[str, str], run_name: str | None, replicas: int,
            stdin_eof: bool) -> int:
    """Serve the node MODULE:ATTR until Ctrl-C or SIGTERM.

    ATTR is a zmqfabric Node, or a function returning one; with --name it is called as
    ATTR(name=NAME), so one definition runs as several named instances. A function that takes
    parameters named scope, config (a NodeConfig with --peer and --control-port), keys (the
    --keys directory) or metrics_port gets them; with --metrics-port, a node that serves no
    metrics of its own serves them there. Prints a `ready` line once the node is on the fabric.

    With --replicas N, runs N such processes named NAME-1 .. NAME-N; Ctrl-C or SIGTERM stops
    them all, and a replica that exits by itself is reported (the first non-zero exit code is
    the command's). A handler that raises SystemExit makes its node leave the fabric and the
    process exit with that code."""
    if replicas > 1:
        names = replica_names(run_name or cfg.name, replicas)
        if isinstance(resolve_target(target), (Node, aio.Node)):
            raise BadInput(f"--replicas needs a function {target[1]}(name: str) -> Node, not a "
                           "node: each replica makes its own")
        return run_replicas(cfg, f"{target[0]}:{target[1]}", names)
    node = _load_node(target, run_name or cfg.name, cfg)
    if stdin_eof:
        threading.Thread(target=_stop_at_eof, args=(node,), name="cli-stdin-watch",
                         daemon=True).start()  # daemon: a blocking read nothing can interrupt
    if node.config.scope != cfg.scope:
        note(f"node {node.name!r} sets its own scope {scope_text(node.config.scope)}")
    if not node.config.scope.is_local and node.config.keys is None:
        warn(plain_lan_warning(node.config.scope))
    signum: int | None = None
    if isinstance(node, aio.Node):
        stopped_by: list[int] = []
        asyncio.run(_run_async(cfg, node, stopped_by.append))
        signum = stopped_by[0] if stopped_by else None
    else:
        try:
            node.start()
            _announce(cfg, node, "ready")
            signum = serve_until_stopped(node)
        finally:
            node.close()
    _announce(cfg, node, "stopped")
    return _exit_for(signum)


async def _run_async(cfg: CliConfig, node: aio.Node, stopped: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()

    def stop(signum: int) -> None:
        stopped(signum)
        node.stop()

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


def _announce(cfg: CliConfig, node: Node | aio.Node, event: str) -> None:
    record = node.record
    metrics = node.metrics_url
    if cfg.json:
        extra = {"metrics": metrics} if metrics and event == "ready" else {}
        emit({"event": event, "node": record_json(record) if event == "ready" else
              {"name": node.name, "id": node.node_id}, **extra})
    elif event == "ready":
        at = f"; metrics at {metrics}" if metrics else ""
        click.echo(f"ready: node {node.name} (pid {record.pid}) at {record.address}, offering "
                   f"{endpoints_text(record) or 'nothing'}{at}; Ctrl-C to stop")
    else:
        click.echo(f"{event}: node {node.name}")


def resolve_target(target: tuple[str, str]) -> Any:
    """Import MODULE (from the current directory too, like ``python -m``) and return ATTR.
    Raises BadInput."""
    module_name, attr = target
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
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
    return obj


def _load_node(target: tuple[str, str], name: str | None, cfg: CliConfig) -> Node | aio.Node:
    module_name, attr = target
    spec = f"{module_name}:{attr}"
    if cfg.scope.interface is not None:
        os.environ[INTERFACE_ENV] = cfg.scope.interface  # nodes made with the default scope follow
    os.environ[FABRIC_ENV] = cfg.fabric  # and nodes made without a fabric join --fabric's
    obj = resolve_target(target)
    if isinstance(obj, (Node, aio.Node)):
        if name is not None and name != obj.name:
            raise BadInput(f"{spec} is the node {obj.name!r}; to run it under other names make "
                           f"{attr} a function: def {attr}(name: str) -> Node")
        return _check_options(obj, cfg, spec, attr)
    if not callable(obj):
        raise BadInput(f"{spec} is a {type(obj).__name__}, not a Node or a function returning one")
    kwargs: dict[str, Any] = {} if name is None else {"name": name}
    try:
        params = inspect.signature(obj).parameters
        if "config" in params and (cfg.peers or cfg.control_port):
            kwargs["config"] = cfg.node_config()
        elif "scope" in params:
            kwargs["scope"] = cfg.scope
        if "keys" in params and cfg.keys_dir is not None:
            kwargs["keys"] = cfg.keys_dir
        if "metrics_port" in params and cfg.metrics_port is not None:
            kwargs["metrics_port"] = cfg.metrics_port
        inspect.signature(obj).bind(**kwargs)
    except (TypeError, ValueError) as exc:
        need = "needs --name" if name is None else "cannot be called with name=..."
        raise BadInput(f"{spec} {need} ({exc})") from exc
    node = obj(**kwargs)
    if not isinstance(node, (Node, aio.Node)):
        raise BadInput(f"{spec}(...) returned a {type(node).__name__}, not a zmqfabric Node")
    return _check_options(node, cfg, spec, attr)


def _check_options(node: Node | aio.Node, cfg: CliConfig, spec: str, attr: str) -> Node | aio.Node:
    """Refuse a node made without the --keys asked for; note other global options it ignores."""
    if cfg.keys is not None and node.config.keys is None:
        raise BadInput(f"--keys was given but {spec} made node {node.name!r} without keys; "
                       f"let {attr} take them: def {attr}(name: str, keys=None) -> "
                       "Node(name, keys=keys)")
    ignored = [opt for opt, used in (("--peer", node.config.peers == cfg.peers),
                                     ("--control-port",
                                      node.config.control_port == cfg.control_port))
               if not used]
    if cfg.metrics_port is not None and node.runtime.metrics is None:
        node.serve_metrics(cfg.metrics_port)  # a node made without metrics takes --metrics-port
    if node.config.fabric != cfg.fabric:
        note(f"node {node.name!r} joins its own fabric {node.config.fabric!r}, not "
             f"{cfg.fabric!r}")
    if ignored:
        note(f"node {node.name!r} does not use {' and '.join(ignored)}: let {attr} take a "
             "config parameter (a NodeConfig)")
    return node


# --- device ------------------------------------------------------------------------------------

#: What each device relays: the kind of endpoint, and how its clients are told to reach it.
_RELAYS = {
    "queue": (EndpointKind.REPLY, "callers", "req {name} --via {via}"),
    "forwarder": (EndpointKind.STREAM, "subscribers", "sub {name} --via {via}"),
    "streamer": (EndpointKind.PIPELINE, "pushers", "push {name} --via {via}"),
}
_NOT_NODE_NAME = re.compile(r"[^a-z0-9_-]+")


@click.command("device")
@click.argument("kind", metavar="queue|forwarder|streamer",
                type=click.Choice(sorted(_RELAYS)))
@click.argument("name")
@click.option("--name", "node_name", type=NodeName(), metavar="NODE",
              help="Name of the device node (default <kind>-<NAME>); clients give it as --via.")
@common
@pass_config
def device_cmd(cfg: CliConfig, kind: str, name: str, node_name: str | None) -> int:
    """Run a forwarding device for NAME until Ctrl-C or SIGTERM.

    \b
      queue      relays service NAME: load-balances requests over its providers
                 (least recently used); callers use `req NAME --via NODE`
      forwarder  relays stream NAME: one hub for all its publishers;
                 subscribers use `sub NAME --via NODE`
      streamer   relays pipeline NAME: pushers use `push NAME --via NODE`;
                 it deals to every puller of NAME

    Prints one `ready` line saying what it relays and how clients reach it (via=NODE), and a
    `stopped` line with its counters on the way out."""
    # devices/ is installed as zmqfabric.devices (setup.cfg package_dir), unseen by mypy here;
    # it imports the node layer, so load it on use.
    from ..devices import KINDS  # type: ignore[import-not-found,unused-ignore]

    relayed, clients, how = _RELAYS[kind]
    try:
        validate_endpoint_name(name, relayed.noun)
    except InvalidNameError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from exc
    via = node_name or cfg.name or _device_node_name(kind, name)
    node = cfg.node(advertise=True, name=via)
    try:
        node.start()
        device = KINDS[kind](node, name)
        device.start()
        try:
            _device_ready(cfg, node, kind, relayed, name, clients, how)
            signum = serve_until_stopped(node)
            stats = device.statistics().as_dict()
        finally:
            device.stop()
    finally:
        node.close()
    if cfg.json:
        emit({"event": "stopped", "device": kind, "relays": {"kind": relayed.noun, "name": name},
              "via": node.name, "stats": stats})
    else:
        click.echo(f"stopped: {kind} for {relayed.noun} {name!r} (node {node.name}); message "
                   f"frames: front in {stats['front_frames_in']} out {stats['front_frames_out']}, "
                   f"back in {stats['back_frames_in']} out {stats['back_frames_out']}")
    return _exit_for(signum)


def _device_node_name(kind: str, name: str) -> str:
    """``<kind>-<NAME>`` made a valid node name (lower case, [a-z0-9_-], 46 characters)."""
    return _NOT_NODE_NAME.sub("-", f"{kind}-{name}".lower())[:46].rstrip("-_")


def _device_ready(cfg: CliConfig, node: Node, kind: str, relayed: EndpointKind, name: str,
                  clients: str, how: str) -> None:
    record = node.record
    if cfg.json:
        emit({"event": "ready", "device": kind, "relays": {"kind": relayed.noun, "name": name},
              "front": VIA_KIND[relayed].value, "via": node.name, "node": record_json(record)})
        return
    command = how.format(name=name, via=node.name)
    click.echo(f"ready: {kind} relaying {relayed.noun} {name!r} as node {node.name} at "
               f"{record.address}; {clients} reach it with via={node.name} "
               f"(`zmqfabric {command}`); Ctrl-C to stop")


# --- demo --------------------------------------------------------------------------------------


@click.command("demo")
@click.option("--duration", type=Seconds(), default=6.0, show_default=True,
              help="Seconds of traffic (start-up and shutdown add a few).")
@click.option("--workers", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Pipeline workers.")
@common
@pass_config
def demo_cmd(cfg: CliConfig, duration: float, workers: int) -> None:
    """Start a small fabric of real processes on this host and measure it: a service with 2
    providers and a client, a stream with 2 subscribers, and a pipeline producer -> workers ->
    sink. Prints progress each second and a summary; Ctrl-C stops everything. With the global
    --metrics-port P, the nodes serve Prometheus metrics on ports P, P+1, ..."""
    from .demo import run as demo

    ignored = [opt for opt, given in (("--keys", cfg.keys is not None), ("--peer", cfg.peers),
                                      ("--control-port", cfg.control_port)) if given]
    if ignored:
        note(f"the demo runs its own nodes without {', '.join(ignored)}")
    settings = demo.DemoSettings(duration=duration, workers=workers, scope=cfg.scope,
                                 metrics_port=cfg.metrics_port)
    if cfg.metrics_port is not None:
        last = cfg.metrics_port + settings.node_count - 1
        if last > 65535:
            raise click.BadParameter(f"the demo needs {settings.node_count} consecutive ports "
                                     f"from {cfg.metrics_port}", param_hint="--metrics-port")
        note(f"metrics: http://{cfg.scope.address}:{cfg.metrics_port}..{last}/metrics "
             "(one port per node, in the order the nodes start)")
    summary = demo.run_demo(settings, lambda event: _demo_event(cfg, event))
    if cfg.json:
        emit({"event": "summary", **summary.as_dict()})
    else:
        for line in demo.summary_lines(summary):
            click.echo(line)
    if not summary.ok:
        raise FabricError("the demo's counts do not match (see the summary above)")


def _demo_event(cfg: CliConfig, event: Any) -> None:
    if cfg.json:
        emit(event.as_dict())
    else:
        click.echo(event.text())
