"""What the global options decide (:class:`CliConfig`, built once by the group callback) and the
parameter types that validate the command line, so a bad value is one clear usage error (exit 2)
before any node starts."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import click

from ..config import NodeConfig, Scope, parse_peer
from ..constants import DEFAULT_FABRIC
from ..core.records import validate_endpoint_name, validate_fabric_name, validate_node_name
from ..errors import InvalidNameError, LocalProtocolError
from ..node import Node
from ..security.keys import KeySet
from ..tasks.config import TaskConfig, validate_task_name
from .output import BadInput, clip

#: Default for every bounded wait of the CLI (discovery, replies, subscribers).
DEFAULT_TIMEOUT_S = 5.0
#: Loops that wait wake at least this often, so every wait is bounded and interruptible.
WAIT_SLICE_S = 1.0


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
    #: ``--keys DIR`` as given (user factories of ``run`` get it) and the keys loaded from it.
    keys_dir: str | None = None
    keys: KeySet | None = None
    peers: tuple[str, ...] = ()
    control_port: int = 0
    #: --metrics-port: the command's node serves Prometheus metrics there (None: it does not).
    metrics_port: int | None = None
    verbose: int = 0
    fabric: str = DEFAULT_FABRIC

    def node_config(self, **extra: Any) -> NodeConfig:
        return NodeConfig(scope=self.scope, control_port=self.control_port, peers=self.peers,
                          fabric=self.fabric, **extra)

    def node(self, *, advertise: bool, name: str | None = None,
             tasks: TaskConfig | None = None) -> Node:
        """A node of this command with the global options' scope, keys, peers and port.

        Without --name, the node is ``cli-PID-XXXX`` (4 random hex digits: unique across hosts
        whose PIDs coincide), so it does not listen for a rival of its name before it starts."""
        name = name or self.name
        if name is not None:
            return Node(name, config=self.node_config(), keys=self.keys, advertise=advertise,
                        tasks=tasks, metrics_port=self.metrics_port)
        return Node(f"cli-{os.getpid()}-{secrets.token_hex(2)}",
                    config=self.node_config(claim_window_s=0.0), keys=self.keys,
                    advertise=advertise, on_conflict="suffix", tasks=tasks,
                    metrics_port=self.metrics_port)

    def observer(self, *, tasks: TaskConfig | None = None) -> Node:
        """A node that finds and calls others but is not listed (``advertise=False``).

        With ``--peer`` it is listed after all: only an advertised node introduces itself to its
        seed peers, and only then do they (and the nodes they know) introduce themselves back."""
        return self.node(advertise=bool(self.peers), tasks=tasks)

    def member(self) -> Node:
        """A listed node, for commands that offer an endpoint (``pub``, ``pull``)."""
        return self.node(advertise=True)

    @property
    def deadline(self) -> float | None:
        """The monotonic deadline of watch-like commands: only an explicit --timeout sets one."""
        return time.monotonic() + self.timeout if self.timeout_given else None


pass_config = click.make_pass_decorator(CliConfig)


def next_wait(deadline: float | None) -> float | None:
    """Seconds for the next bounded wait, or None once ``deadline`` has passed."""
    if deadline is None:
        return WAIT_SLICE_S
    left = deadline - time.monotonic()
    return None if left <= 0 else min(left, WAIT_SLICE_S)


# --- per-command --json / --timeout ----------------------------------------------------------


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


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """A per-command --json (as the global option)."""
    return click.option("--json", "json_", is_flag=True, default=None, expose_value=False,
                        callback=_override,
                        help="JSON lines output (as the global option).")(command)


def common(command: Callable[..., Any]) -> Callable[..., Any]:
    """Per-command --json and --timeout (as the global options)."""
    command = json_option(command)
    return click.option("--timeout", type=Seconds(), expose_value=False, callback=_override,
                        help="Bounded wait in seconds (as the global option).")(command)


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


class FabricName(click.ParamType):
    name = "fabric"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> str:
        try:
            return validate_fabric_name(value)
        except InvalidNameError as exc:
            self.fail(str(exc), param, ctx)


class EndpointName(click.ParamType):
    def __init__(self, what: str) -> None:
        self.what = what
        self.name = what

    def convert(self, value: Any, param: Param, ctx: Ctx) -> str:
        try:
            if self.what == "task":
                return validate_task_name(value)
            return validate_endpoint_name(value, self.what)
        except InvalidNameError as exc:
            self.fail(str(exc), param, ctx)


class Peer(click.ParamType):
    """A seed peer ``[KEY@]HOST:PORT`` (the peer's control port, its public key if secured)."""

    name = "[KEY@]HOST:PORT"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> str:
        try:
            parse_peer(str(value))
        except LocalProtocolError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


class JsonBody(click.ParamType):
    name = "json"

    def convert(self, value: Any, param: Param, ctx: Ctx) -> Body:
        if isinstance(value, Body):
            return value
        try:
            return Body(parse_body(str(value), "the body"))
        except BadInput as exc:
            self.fail(f"{exc.message}; quote it for the shell, e.g. '{{\"x\": 1}}'", param, ctx)


#: The deepest nesting a JSON body may have: msgpack refuses 512 levels, and a body nested
#: this deep is a mistake (or an attack on whoever decodes it).
MAX_BODY_DEPTH = 100
#: Integers msgpack can carry.
_INT_RANGE = range(-(2**63), 2**64)


def parse_body(text: str, where: str) -> Any:
    """One JSON value the user gave, checked to be something msgpack can send. Raises BadInput
    (exit 2) saying what is wrong with it and ``where`` it was."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}): "
                       f"{clip(text.strip())}") from exc
    except RecursionError as exc:
        raise BadInput(f"{where} nests JSON deeper than {MAX_BODY_DEPTH} levels") from exc
    except ValueError as exc:  # an integer of more digits than Python converts (4300)
        raise BadInput(f"{where} has an integer of more than {sys.get_int_max_str_digits()} "
                       "digits") from exc
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_BODY_DEPTH:
            raise BadInput(f"{where} nests JSON deeper than {MAX_BODY_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif type(item) is int and item not in _INT_RANGE:
            raise BadInput(f"{where} has an integer beyond 64 bits, which msgpack cannot carry: "
                           f"{clip(str(item))}")
    return value


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
