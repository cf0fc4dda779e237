"""What the CLI prints and how it ends: exit codes, one-line errors, tables and JSON lines.

Every command writes through these helpers, so ``--json`` output is one JSON value per line and
text output is aligned tables. Fabric errors become one ``error: ...`` line on stderr and the exit
code of :func:`exit_code`; nothing prints a traceback for a fabric error.
"""

from __future__ import annotations

import datetime
import enum
import json
import re
import sys
from typing import Any

import click

from ..config import Scope
from ..core.records import NodeRecord
from ..errors import (
    AuthorizationError,
    FabricError,
    FabricTimeoutError,
    LocalProtocolError,
    NameConflictError,
    NodeNotFoundError,
    NoProviderError,
    RemoteError,
    RemoteProtocolError,
    TaskFailedError,
)


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    TIMEOUT = 4
    REMOTE = 5
    CONFLICT = 6
    REFUSED = 7
    INTERRUPTED = 130
    TERMINATED = 143


class NotFound(FabricError, LookupError):
    """Something the command needs is not on the fabric (exit code 3), e.g. a ``--via`` node
    that relays nothing of that name."""


#: Checked in order: the first matching class gives the exit code.
_EXIT_CODES: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (NoProviderError, ExitCode.NOT_FOUND),
    (NodeNotFoundError, ExitCode.NOT_FOUND),
    (NotFound, ExitCode.NOT_FOUND),
    (FabricTimeoutError, ExitCode.TIMEOUT),
    (RemoteError, ExitCode.REMOTE),
    (RemoteProtocolError, ExitCode.REMOTE),
    (TaskFailedError, ExitCode.REMOTE),
    (NameConflictError, ExitCode.CONFLICT),
    (AuthorizationError, ExitCode.REFUSED),
    (LocalProtocolError, ExitCode.USAGE),
    (FabricError, ExitCode.FAILURE),
)

EPILOG = """\b
Exit codes:
  0    success
  1    other failure (e.g. discovery cannot start; the demo failed; a journal error)
  2    usage error or bad input (invalid JSON, invalid name, bad key directory, unknown option)
  3    not found: no node of that name, no provider of that service/pipeline/task,
       a --via node that relays no such endpoint
  4    timeout: providers exist but did not answer; --count not reached; tasks not done
  5    remote error: the handler raised (a task was dead-lettered), or the peer broke
       the protocol
  6    node name conflict
  7    refused: a secured peer does not allow this node's key
  130  interrupted (Ctrl-C); 143 terminated (SIGTERM); `run` and `device` exit 0 on SIGTERM

\b
Bodies are JSON: an argument, or one JSON value per stdin line when the argument is absent.

\b
Environment: each global option above also comes from its variable (ZMQFABRIC_LAN,
ZMQFABRIC_INTERFACE, ZMQFABRIC_FABRIC, ZMQFABRIC_KEYS, ZMQFABRIC_PEER, ZMQFABRIC_CONTROL_PORT,
ZMQFABRIC_METRICS_PORT, ZMQFABRIC_JSON, ZMQFABRIC_TIMEOUT, ZMQFABRIC_NAME, ZMQFABRIC_VERBOSE);
a command's options from ZMQFABRIC_<COMMAND>_<OPTION> (e.g. ZMQFABRIC_TOP_INTERVAL=5,
ZMQFABRIC_REQ_RETRIES=2). Nodes made by `run` also read ZMQFABRIC_INTERFACE and
ZMQFABRIC_FABRIC. The terminal width comes from COLUMNS when set.

\b
Shell completion (commands, options): add to ~/.bashrc
  eval "$(_ZMQFABRIC_COMPLETE=bash_source zmqfabric)"
(zsh: zsh_source in ~/.zshrc; fish: _ZMQFABRIC_COMPLETE=fish_source zmqfabric | source).
"""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt (closing nodes on the way out)."""


class BadInput(click.ClickException):
    """Input the user gave is unusable (exit code 2)."""

    exit_code = ExitCode.USAGE


def exit_code(exc: BaseException) -> ExitCode:
    """The exit code of a fabric error (see EPILOG)."""
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return ExitCode.FAILURE


# --- JSON ------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """``value`` with bytes made text (or ``{"$hex": ...}``) and keys made strings."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return data.decode()
        except UnicodeDecodeError:
            return {"$hex": data.hex()}
    return value


def dumps(value: Any, indent: int | None = None) -> str:
    """JSON text safe for a terminal: JSON escapes C0 controls itself; DEL, C1 controls and
    bidirectional overrides are escaped here too (``\\u0085`` in a JSON string is the same
    character, so the output stays valid JSON of the same value)."""
    text = json.dumps(jsonable(value), ensure_ascii=False, indent=indent, default=repr)
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def emit(value: Any) -> None:
    """One JSON line on stdout."""
    click.echo(dumps(value))


def warn(text: str) -> None:
    click.echo(f"warning: {text}", err=True)


def note(text: str) -> None:
    click.echo(f"note: {text}", err=True)


# --- text ------------------------------------------------------------------------------------

#: Characters a remote peer could use to rewrite the terminal (escape sequences, carriage
#: returns, bidirectional overrides) or to forge output lines.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                     "\u2066-\u2069]")
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                             "\u2066-\u2069]")


def printable(value: object) -> str:
    """``value`` as one line of text with every control character escaped (``\\x1b``): for
    strings that come from the network (node answers, topics, error texts)."""
    return _UNSAFE.sub(_escape, str(value))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def node_line(answer: dict[str, Any]) -> str:
    """"name (host H, pid P, up U s)" of a control answer, whatever the peer put in it."""
    uptime = answer.get("uptime_s")
    up = f"{uptime:.1f}" if isinstance(uptime, (int, float)) else "?"
    return (f"{printable(answer.get('node', '?'))} (host {printable(answer.get('host', '?'))}, "
            f"pid {printable(answer.get('pid', '?'))}, up {up} s)")


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Aligned lines: the header, then one per row."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [headers, *rows]]


def echo_table(headers: list[str], rows: list[list[str]]) -> None:
    for line in table(headers, rows):
        click.echo(line)


# --- rich tables (``top``, ``ls``): imported by the commands that draw them ------------------


def console() -> Any:
    """A rich console on stdout, as wide as the terminal (COLUMNS when set; 80 when stdout is
    not a terminal). Markup, emoji codes and highlighting are off: cells are plain text, and
    text from the network cannot restyle the terminal."""
    from rich.console import Console

    return Console(file=sys.stdout, emoji=False, highlight=False, markup=False,
                   soft_wrap=False)


def new_table(headers: list[str], *, flexible: str, numeric: frozenset[str] | set[str] = frozenset()
              ) -> Any:
    """A borderless rich table that fits the console: every column keeps its content on one
    line except ``flexible``, which takes the width left and folds; ``numeric`` columns are
    right-aligned. Cells are escaped with :func:`printable`."""
    from rich.table import Table
    from rich.text import Text

    class PlainTable(Table):
        def add_row(self, *cells: Any, **kwargs: Any) -> None:
            super().add_row(*(Text(printable(c)) if isinstance(c, str) else c for c in cells),
                            **kwargs)

    grid = PlainTable(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for header in headers:
        if header == flexible:
            grid.add_column(header, overflow="fold", ratio=1, min_width=8)
        else:
            grid.add_column(header, no_wrap=True,
                            justify="right" if header in numeric else "left")
    return grid


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def now_iso() -> str:
    return datetime.datetime.now().isoformat(timespec="milliseconds")


# --- records ---------------------------------------------------------------------------------


def record_json(record: NodeRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "id": record.node_id,
        "host": record.host,
        "pid": record.pid,
        "address": record.address,
        "fabric": record.fabric,
        "secured": record.curve_key is not None,
        "key": record.curve_key,
        "endpoints": [{"kind": e.kind.value, "name": e.name, "port": e.port}
                      for e in record.endpoints],
    }


def endpoints_text(record: NodeRecord) -> str:
    return " ".join(f"{e.kind.value}:{e.name}" for e in record.endpoints if e.kind.value != "ctl")


def scope_text(scope: Scope) -> str:
    return "this host (127.0.0.1)" if scope.is_local else f"{scope.interface} ({scope.address})"


def plain_lan_warning(scope: Scope) -> str:
    return (f"traffic on {scope_text(scope)} is unauthenticated and unencrypted: anyone on "
            "that network can read it and call these nodes; give them keys (--keys DIR)")
