"""The ``zmqfabric`` command line (click). Thin: every command is a few calls on a :class:`Node`.

The group callback builds one frozen :class:`CliConfig` into ``ctx.obj``; commands receive it with
``@pass_config``. Options also come from the environment (``ZMQFABRIC_INTERFACE``,
``ZMQFABRIC_TIMEOUT``, ``ZMQFABRIC_JSON``, ``ZMQFABRIC_KEYS``...). Errors become one
``error: ...`` line on stderr and the exit codes of :class:`ExitCode`; nothing here prints a
traceback for a fabric error.

Modules: :mod:`.config` (CliConfig, parameter types), :mod:`.output` (exit codes, tables, JSON
lines), and the commands: :mod:`.fabric` (ls, ping, stats), :mod:`.top`, :mod:`.messaging`
(req, pub, sub, push, pull), :mod:`.tasks` (submit), :mod:`.operate` (run, device, demo),
:mod:`.keys` (keys generate|show|allow).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import Any, NoReturn, Sequence

import click

from .. import __version__
from ..config import FABRIC_ENV, INTERFACE_ENV, Scope, parse_peer
from ..constants import DEFAULT_FABRIC
from ..errors import FabricError, LocalProtocolError
from ..security import keys as keyfiles
from .config import (
    DEFAULT_TIMEOUT_S,
    CliConfig,
    FabricName,
    Interface,
    NodeName,
    Peer,
    Seconds,
)
from .output import (
    EPILOG,
    BadInput,
    ExitCode,
    Terminated,
    exit_code,
    plain_lan_warning,
    printable,
    warn,
)

__all__ = ["BadInput", "CliConfig", "ExitCode", "cli", "exit_code", "invoke", "main"]

#: Command -> "module:attribute" of its click command, imported when the command runs (or
#: --help lists it): a one-shot `req` does not pay for `top`'s tables or the devices.
COMMANDS = {
    "demo": ".operate:demo_cmd",
    "device": ".operate:device_cmd",
    "keys": ".keys:keys_group",
    "ls": ".fabric:ls_cmd",
    "ping": ".fabric:ping_cmd",
    "pub": ".messaging:pub_cmd",
    "pull": ".messaging:pull_cmd",
    "push": ".messaging:push_cmd",
    "req": ".messaging:req_cmd",
    "run": ".operate:run_cmd",
    "stats": ".fabric:stats_cmd",
    "sub": ".messaging:sub_cmd",
    "submit": ".tasks:submit_cmd",
    "top": ".top:top_cmd",
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (see COMMANDS)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, _, attr = COMMANDS[cmd_name].partition(":")
            command = getattr(importlib.import_module(module, __name__), attr)
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--lan", is_flag=True, envvar="ZMQFABRIC_LAN", show_envvar=True,
              help="Join the LAN of the default-route interface.")
@click.option("--interface", "scope", type=Interface(), metavar="IFACE", envvar=INTERFACE_ENV,
              show_envvar=True,
              help="Join the LAN of interface IFACE (default: this host only, 127.0.0.1).")
@click.option("--fabric", type=FabricName(), default=DEFAULT_FABRIC, envvar=FABRIC_ENV,
              show_envvar=True, show_default=True,
              help="The fabric to join: nodes of other fabrics are never seen or reached.")
@click.option("--keys", "keys_dir", type=click.Path(file_okay=False), metavar="DIR",
              envvar="ZMQFABRIC_KEYS", show_envvar=True,
              help="CURVE key directory of this command's node (`zmqfabric keys generate`): "
                   "traffic is encrypted and only keys in DIR's allow-list get in.")
@click.option("--peer", "peers", type=Peer(), multiple=True, envvar="ZMQFABRIC_PEER",
              show_envvar=True,
              help="Seed peer [KEY@]HOST:PORT (its control port; KEY if it is secured) for "
                   "nodes mDNS cannot reach; repeatable (in the variable: separated by "
                   "spaces). The command's node then introduces itself to them, so it is "
                   "listed while it runs.")
@click.option("--control-port", type=click.IntRange(0, 65535), default=0, metavar="PORT",
              envvar="ZMQFABRIC_CONTROL_PORT", show_envvar=True,
              help="Fixed control port of this command's node, so others can seed from it "
                   "(default: any free port).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
              envvar="ZMQFABRIC_METRICS_PORT", show_envvar=True,
              help="Serve this command's node's Prometheus metrics at "
                   "http://ADDRESS:PORT/metrics (ADDRESS: 127.0.0.1, or the --lan/--interface "
                   "address; 0: any free port). For `run`, `device`, `sub`, `pull`.")
@click.option("--json", "json_", is_flag=True, envvar="ZMQFABRIC_JSON", show_envvar=True,
              help="Output JSON lines instead of tables.")
@click.option("--timeout", type=Seconds(), default=DEFAULT_TIMEOUT_S, envvar="ZMQFABRIC_TIMEOUT",
              show_envvar=True, show_default=True,
              help="Seconds to wait for nodes, providers and replies.")
@click.option("--name", type=NodeName(), envvar="ZMQFABRIC_NAME", show_envvar=True,
              help="Node name of this command (default cli-PID-XXXX).")
@click.option("-v", "--verbose", count=True, envvar="ZMQFABRIC_VERBOSE", show_envvar=True,
              help="Log more (-v info, -vv debug).")
@click.version_option(version=__version__, prog_name="zmqfabric")
@click.pass_context
def cli(ctx: click.Context, lan: bool, scope: Scope | None, fabric: str, keys_dir: str | None,
        peers: tuple[str, ...], control_port: int, metrics_port: int | None, json_: bool,
        timeout: float, name: str | None, verbose: int) -> None:
    """zmqfabric: a brokerless messaging fabric. Nodes find each other by name (zeroconf) and
    talk over ZeroMQ. By default everything stays on this host."""
    logging.getLogger().setLevel(max(logging.DEBUG, logging.WARNING - 10 * verbose))
    if lan:
        if scope is not None and _given(ctx, "scope"):
            raise click.UsageError("give either --lan or --interface, not both")
        try:
            scope = Scope.lan()  # --lan wins over ZMQFABRIC_INTERFACE
        except LocalProtocolError as exc:
            raise click.BadParameter(str(exc), param_hint="--lan") from exc
    cfg = CliConfig(
        scope=scope or Scope.local(),
        json=json_,
        timeout=timeout,
        timeout_given=_given(ctx, "timeout"),
        name=name,
        keys_dir=keys_dir,
        keys=_load_keys(ctx, keys_dir),
        peers=peers,
        control_port=control_port,
        metrics_port=metrics_port,
        verbose=verbose,
        fabric=fabric,
    )
    if any(parse_peer(peer)[2] for peer in peers) and cfg.keys is None and _makes_node(ctx):
        raise click.BadParameter("a peer given with its KEY@ is secured: this node needs "
                                 "keys too (--keys DIR)", param_hint="--peer")
    if not cfg.scope.is_local and cfg.keys is None and _makes_node(ctx) and \
            ctx.invoked_subcommand != "run":
        warn(plain_lan_warning(cfg.scope))
    ctx.obj = cfg


def _given(ctx: click.Context, param: str) -> bool:
    source = ctx.get_parameter_source(param)
    return source is not None and source is not click.core.ParameterSource.DEFAULT


def _makes_node(ctx: click.Context) -> bool:
    """``keys`` only handles files (and takes --keys as its default DIR, not as keys to load)."""
    return ctx.invoked_subcommand != "keys"


def _load_keys(ctx: click.Context, keys_dir: str | None) -> keyfiles.KeySet | None:
    """The keys of --keys DIR, checked once here (``keys`` commands take DIR as a default)."""
    if keys_dir is None or not _makes_node(ctx):
        return None
    try:
        return keyfiles.load(keys_dir)
    except LocalProtocolError as exc:
        raise click.BadParameter(str(exc), param_hint="--keys") from exc


# --- entry point -------------------------------------------------------------------------------


class _LogFormatter(logging.Formatter):
    """``2024-05-01 12:00:00.123 error: message``, then the traceback of a logged exception.
    Every line goes through ``printable``: log text may quote what a peer sent."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        line = (f"{stamp}.{int(record.msecs):03d} {record.levelname.lower()}: "
                f"{printable(record.getMessage())}")
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join(f"\n{printable(part)}" for part in trace.splitlines())
        return line


class _QuietLibraryWarnings(logging.Filter):
    """Library warnings the CLI reports its own way, recognised by their ``zf_event`` tag:

    - ``unsecured_lan`` ("node X is on IFACE without keys"): the CLI warns once per command,
      not once per node;
    - ``peer_refused`` ("ignoring node X ..."): a line per refused peer is noise on a shared
      fabric; `ls` lists them with the reason, and a "no provider" error names refused peers
      that offer it. Shown with -v."""

    def filter(self, record: logging.LogRecord) -> bool:
        event = getattr(record, "zf_event", None)
        if event == "unsecured_lan":
            return False
        if event == "peer_refused":
            return logging.getLogger().getEffectiveLevel() <= logging.INFO
        return True


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


def invoke(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (errors reported on stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormatter())
    handler.addFilter(_QuietLibraryWarnings())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    _install_interrupts()
    try:
        result: Any = cli.main(args=list(argv) if argv is not None else None,
                               prog_name="zmqfabric", standalone_mode=False,
                               auto_envvar_prefix="ZMQFABRIC")
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
        click.echo(f"error: {printable(exc.format_message())}{hint}", err=True)
        return ExitCode.USAGE
    except click.ClickException as exc:
        click.echo(f"error: {printable(exc.format_message())}", err=True)
        return exc.exit_code
    except FabricError as exc:
        click.echo(f"error: {printable(exc)}", err=True)
        return exit_code(exc)
    return int(result) if isinstance(result, int) else ExitCode.OK


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point."""
    sys.exit(invoke(argv))
