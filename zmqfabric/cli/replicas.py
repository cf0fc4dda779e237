"""``zmqfabric run MODULE:FACTORY --name NAME --replicas N``: N processes of one node factory,
named NAME-1 .. NAME-N, for handlers that need more than one core.

The parent starts each replica as ``zmqfabric run MODULE:FACTORY --name NAME-i`` with the same
global options, in a process group of its own (a terminal's Ctrl-C reaches the parent only, which
stops each replica once, with SIGTERM). It then waits: a replica that exits by itself is reported
and the others keep serving; SIGINT or SIGTERM stops them all (SIGKILL for one that has not
exited after REPLICA_STOP_S). Each replica also stops when the parent vanishes without stopping
it (SIGKILL): its stdin is a pipe from the parent, and end-of-file there stops its node.

Exit code: the first non-zero exit code of a replica (1 for one killed), else 130 after SIGINT
and 0 after SIGTERM or when every replica exited with 0.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from typing import Any

from ..constants import THREAD_JOIN_TIMEOUT_S
from ..core.records import validate_node_name
from ..errors import InvalidNameError
from ..transport.inbox import WakePipe
from .config import WAIT_SLICE_S, CliConfig
from .output import BadInput, ExitCode, note, warn

#: A replica stopped with SIGTERM gets this long (s) to let its handlers finish (at most
#: THREAD_JOIN_TIMEOUT_S), say goodbye and close before it is killed.
REPLICA_STOP_S = 2 * THREAD_JOIN_TIMEOUT_S + 2.0
#: Global options the parent passes on explicitly: the same from the environment would clash
#: (``--lan`` from ZMQFABRIC_LAN next to the explicit ``--interface``).
_OPTION_ENV = ("LAN", "INTERFACE", "FABRIC", "KEYS", "PEER", "CONTROL_PORT", "JSON", "TIMEOUT",
               "NAME", "VERBOSE", "RUN_NAME", "RUN_REPLICAS")


def replica_names(base: str | None, count: int) -> list[str]:
    """NAME-1 .. NAME-count. Raises BadInput without a name or for a name too long."""
    if base is None:
        raise BadInput("--replicas needs --name NAME: the replicas are NAME-1 .. NAME-N")
    names = [f"{base}-{i}" for i in range(1, count + 1)]
    try:
        validate_node_name(names[-1])
    except InvalidNameError as exc:
        raise BadInput(f"replica name {names[-1]!r}: {exc}") from exc
    return names


def child_argv(cfg: CliConfig, spec: str, name: str) -> list[str]:
    """The command line of one replica: this CLI, the parent's global options, ``run``."""
    argv = [sys.executable, "-m", "zmqfabric", "--fabric", cfg.fabric]
    if cfg.scope.interface is not None:
        argv += ["--interface", cfg.scope.interface]
    if cfg.keys_dir is not None:
        argv += ["--keys", cfg.keys_dir]
    for peer in cfg.peers:
        argv += ["--peer", peer]
    if cfg.json:
        argv.append("--json")
    if cfg.timeout_given:
        argv += ["--timeout", repr(cfg.timeout)]
    argv += ["-v"] * cfg.verbose
    return [*argv, "run", spec, "--name", name, "--stop-on-stdin-eof"]


def run_replicas(cfg: CliConfig, spec: str, names: list[str]) -> int:
    """Run one replica per name until they all exit or a signal stops them; returns the exit
    code (see the module docstring). Main thread only."""
    if cfg.control_port:
        raise BadInput("--replicas cannot share one --control-port: give each node its own")
    env = {k: v for k, v in os.environ.items()
           if not any(k == f"ZMQFABRIC_{o}" for o in _OPTION_ENV)}
    signals: list[int] = []
    pipe = WakePipe()
    pipe.open()
    previous = {s: signal.signal(s, lambda signum, _: signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    # A replica's exit only has to wake the wait below: a handler makes its signal write the
    # wake-up pipe (the default disposition of SIGCHLD is to ignore it).
    previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: None)
    old_fd = signal.set_wakeup_fd(pipe.write_fd, warn_on_full_buffer=False)
    children: list[subprocess.Popen[Any]] = []
    try:
        for name in names:
            children.append(subprocess.Popen(child_argv(cfg, spec, name), env=env,
                                             stdin=subprocess.PIPE, process_group=0))
        started = ", ".join(f"{n} (pid {c.pid})" for n, c in zip(names, children, strict=True))
        note(f"replicas of {spec}: {started}")
        return _supervise(children, names, signals, pipe)
    finally:
        for child in children:
            _reap(child)
        signal.set_wakeup_fd(old_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        pipe.close()


def _supervise(children: list[subprocess.Popen[Any]], names: list[str], signals: list[int],
               pipe: WakePipe) -> int:
    codes: dict[int, int] = {}
    failure = 0
    stop_by: int | None = None
    kill_at = 0.0
    while len(codes) < len(children):
        if signals and stop_by is None:
            stop_by = signals[0]
            kill_at = time.monotonic() + REPLICA_STOP_S
            for i, child in enumerate(children):
                if i not in codes:
                    child.send_signal(signal.SIGTERM)
        for i, child in enumerate(children):
            if i in codes or child.poll() is None:
                continue
            codes[i] = code = child.returncode
            if code != 0 and not failure:
                failure = code if code > 0 else ExitCode.FAILURE
            if stop_by is None or code != 0:
                warn(f"replica {names[i]} (pid {child.pid}) exited with code {code}")
        if len(codes) == len(children):
            break
        wait = WAIT_SLICE_S
        if stop_by is not None:
            wait = min(wait, kill_at - time.monotonic())
            if wait <= 0:
                for i, child in enumerate(children):
                    if i not in codes:
                        warn(f"replica {names[i]} did not stop within {REPLICA_STOP_S:g} s; "
                             "killed")
                        child.kill()
                kill_at = time.monotonic() + REPLICA_STOP_S  # reaped at the next turns
                continue
        select.select([pipe.fd], [], [], wait)  # a signal (SIGCHLD too) writes the pipe
        pipe.drain()
    if failure:
        return failure
    return ExitCode.INTERRUPTED if stop_by == signal.SIGINT else ExitCode.OK


def _reap(child: subprocess.Popen[Any]) -> None:
    """Close the replica's stdin (its stop signal if it still runs) and wait for it, bounded."""
    if child.stdin is not None:
        child.stdin.close()
    try:
        child.wait(REPLICA_STOP_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(REPLICA_STOP_S)
