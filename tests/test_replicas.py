"""``zmqfabric run MODULE:FACTORY --name NAME --replicas N``: N processes named NAME-1..NAME-N,
all stopped by one SIGINT/SIGTERM, the exit code reflecting them; replicas stop when their parent
is killed; bad uses are refused before any process starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import zmqfabric as zf
from tests.helpers import unique, wait_until
from tests.procs import ROOT, Child, ProcessGroup

pytestmark = pytest.mark.slow

SLOW = 20.0

MODULE = """
import sys
import zmqfabric as zf

def make(name):
    node = zf.Node(name)

    @node.reply({service!r})
    def whoami(body):
        if body == "exit " + name:
            sys.exit(3)
        return name

    return node

fixed = make("fixed-node-name")
"""


@pytest.fixture
def module(tmp_path: Path) -> tuple[str, dict[str, str], str]:
    """(module name, env to import it, its service)."""
    service = unique("whoami")
    name = f"zf_replicas_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MODULE.format(service=service)))
    return name, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, service


def start(procs: ProcessGroup, module: Any, base: str, count: int) -> tuple[Child, list[str]]:
    mod, env, _ = module
    parent = procs.cli("run", f"{mod}:make", "--name", base, "--replicas", str(count), env=env)
    names = [f"{base}-{i}" for i in range(1, count + 1)]
    ready = {parent.expect("ready: ", SLOW).split()[1] for _ in names}
    assert ready == set(names)
    return parent, names


def answering(caller: zf.Node, service: str, names: list[str]) -> set[str]:
    """Which of ``names`` answer ``service`` (round robin reaches each within a few calls)."""
    for name in names:
        caller.wait_for_node(name, SLOW)
    seen: set[str] = set()
    deadline = time.monotonic() + SLOW
    while seen != set(names) and time.monotonic() < deadline:
        seen.add(caller.request(service, None, timeout=SLOW))
    return seen


def gone(caller: zf.Node, names: list[str]) -> None:
    wait_until(lambda: not any(caller.directory.get(n) for n in names), SLOW, "replicas gone")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_replicas_serve_and_one_signal_stops_them_all(
    procs: ProcessGroup, make_node: Callable[..., zf.Node], module: Any, signum: int
) -> None:
    parent, names = start(procs, module, unique("rep"), 3)
    caller = make_node("caller")
    assert answering(caller, module[2], names) == set(names)

    parent.signal(signum)
    assert parent.wait(SLOW) == (130 if signum == signal.SIGINT else 0), parent.err_tail()
    gone(caller, names)
    for _ in names:  # each replica closed cleanly and said so
        assert parent.expect("stopped: ", SLOW).startswith("node ")


def test_a_replica_that_exits_is_reported_and_its_code_is_the_command_s(
    procs: ProcessGroup, make_node: Callable[..., zf.Node], module: Any
) -> None:
    parent, names = start(procs, module, unique("rep"), 2)
    caller = make_node("caller")
    assert answering(caller, module[2], names) == set(names)
    with pytest.raises(zf.RemoteError):  # round robin: one of two attempts reaches it
        for _ in range(2):
            caller.request(module[2], f"exit {names[0]}", timeout=SLOW)
    gone(caller, names[:1])
    wait_until(lambda: any(f"replica {names[0]}" in line and "exited with code 3" in line
                           for line in parent.stderr), SLOW, "the report",
               detail=parent.err_tail)
    assert answering(caller, module[2], names[1:]) == {names[1]}  # the other one serves on

    parent.signal(signal.SIGTERM)
    assert parent.wait(SLOW) == 3, parent.err_tail()
    gone(caller, names)


def test_replicas_stop_when_their_parent_is_killed(
    procs: ProcessGroup, make_node: Callable[..., zf.Node], module: Any
) -> None:
    parent, names = start(procs, module, unique("rep"), 2)
    caller = make_node("caller")
    for name in names:
        caller.wait_for_node(name, SLOW)
    pids = [caller.ping(n, timeout=SLOW)["pid"] for n in names]
    parent.kill()
    parent.wait(SLOW)
    gone(caller, names)
    wait_until(lambda: not any(_alive(pid) for pid in pids), SLOW, "replica processes ended")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as ended.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("args,words", [
    (["run", "{mod}:make", "--replicas", "2"], ["--replicas needs --name"]),
    (["run", "{mod}:fixed", "--name", "x", "--replicas", "2"], ["needs a function"]),
    (["--control-port", "7999", "run", "{mod}:make", "--name", "x", "--replicas", "2"],
     ["--control-port"]),
    (["run", "{mod}:make", "--name", "a" * 45, "--replicas", "2"], ["replica name"]),
])
def test_bad_replicas_are_refused_before_anything_starts(module: Any, args: list[str],
                                                         words: list[str]) -> None:
    mod, env, _ = module
    argv = [a.format(mod=mod) for a in args]
    done = subprocess.run([sys.executable, "-m", "zmqfabric", *argv], capture_output=True,
                          text=True, timeout=SLOW, env={**os.environ, **env}, cwd=str(ROOT),
                          check=False)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), done.stderr
    assert "ready" not in done.stdout
