"""The command line's edges, as real processes: `push --via` a streamer that has no puller,
one-shot commands back to back with a short --timeout, every environment variable in --help,
shell completion, command options from the environment."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import zmqfabric as zf
from tests.procs import ROOT, ProcessGroup
from tests.test_cli import assert_one_error_line, finish
from zmqfabric.cli import cli

pytestmark = pytest.mark.slow


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, **(env or {}))
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "zmqfabric", *args], capture_output=True,
                          text=True, timeout=timeout, env=full, cwd=str(ROOT), check=False)


def test_push_via_a_streamer_without_puller_is_not_found(
    procs: ProcessGroup, name: Callable[[str], str],
) -> None:
    pipeline, via = name("frames"), name("st")
    device = procs.cli("--json", "device", "streamer", pipeline, "--name", via)
    assert device.json_line(timeout=15)["event"] == "ready"
    code, out, err = finish(procs.cli("--timeout", "1", "push", pipeline, '{"n": 1}',
                                      "--via", via))
    assert code == 3, err
    assert not any("pushed" in line for line in out), out
    assert_one_error_line(err, "no node offers pipeline", pipeline)
    # With a puller behind the streamer, the same command pushes, and the puller gets it.
    with zf.Node(name("sink")) as sink, sink.puller(pipeline) as puller:
        code, out, err = finish(procs.cli("--timeout", "10", "push", pipeline, '{"n": 2}',
                                          "--via", via))
        assert code == 0, err
        assert out == [f"pushed 1 message into pipeline {pipeline!r}"]
        assert puller.recv(timeout=10.0) == {"n": 2}
    device.signal(signal.SIGTERM)
    assert device.wait(10) == 0


def test_one_shot_commands_back_to_back_find_a_running_provider(
    name: Callable[[str], str],
) -> None:
    """Before the quick query, 5 of 8 `--timeout 1 req` in a row said "no node offers": the
    responder held its multicast answer back for a second (RFC 6762 §14)."""
    svc = name("echo")
    node = zf.Node(name("prov"))

    @node.reply(svc)
    def echo(body: object) -> object:
        return body

    node.serve_in_background()
    try:
        for i in range(5):
            done = run("--timeout", "1", "--json", "req", svc, str(i))
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout) == i
    finally:
        node.close()


def _envvars_read_by_the_package() -> set[str]:
    """Every ZMQFABRIC_* name the package's source mentions, and every option's variable."""
    found = set()
    for path in (ROOT / "zmqfabric").rglob("*.py"):
        found |= set(re.findall(r"\bZMQFABRIC_[A-Z][A-Z_]*[A-Z]\b", path.read_text()))
    found |= {p.envvar for p in cli.params if isinstance(getattr(p, "envvar", None), str)}
    # Patterns and names the help explains rather than lists one by one.
    return found - {"ZMQFABRIC_COMPLETE"}


def test_help_names_every_environment_variable() -> None:
    done = run("--help")
    assert done.returncode == 0
    missing = sorted(v for v in _envvars_read_by_the_package() if v not in done.stdout)
    assert not missing, f"--help does not mention {missing}"
    assert "ZMQFABRIC_<COMMAND>_<OPTION>" in done.stdout
    assert "_ZMQFABRIC_COMPLETE=bash_source zmqfabric" in done.stdout


def test_command_options_come_from_the_environment() -> None:
    done = run("req", "svc", "{}", env={"ZMQFABRIC_REQ_RETRIES": "lots"})
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "--retries", "lots")
    done = run("top", "--count", "1", env={"ZMQFABRIC_TOP_INTERVAL": "-1"})
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "--interval")


def test_shell_completion(tmp_path: Path) -> None:
    script = run(env={"_ZMQFABRIC_COMPLETE": "bash_source"})
    assert script.returncode == 0
    assert "complete -o nosort -F _zmqfabric_completion zmqfabric" in script.stdout
    words = run(env={"_ZMQFABRIC_COMPLETE": "bash_complete", "COMP_WORDS": "zmqfabric re",
                     "COMP_CWORD": "1"})
    assert words.stdout.split() == ["plain,req"]
    options = run(env={"_ZMQFABRIC_COMPLETE": "bash_complete",
                       "COMP_WORDS": "zmqfabric --metrics", "COMP_CWORD": "1"})
    assert "plain,--metrics-port" in options.stdout.split()


def test_ls_lists_every_node_and_stops_when_the_answers_do(
    name: Callable[[str], str],
) -> None:
    """Every node answers a new node's first query at once, so `ls` need not sit out a fixed
    1.5 s window: it stops once no node has joined for a quarter of a second."""
    fabric = name("lsfab")
    nodes = [zf.Node(name("listed"), fabric=fabric) for _ in range(6)]
    try:
        for node in nodes:
            node.start()
        # What Python and the imports cost here now (the machine may be loaded).
        start = time.monotonic()
        assert run("--fabric", fabric, "--json", "ls", "--help").returncode == 0
        baseline = time.monotonic() - start
        start = time.monotonic()
        done = run("--fabric", fabric, "--json", "ls")
        took = time.monotonic() - start
        assert done.returncode == 0, done.stderr
        assert {json.loads(line)["name"] for line in done.stdout.splitlines()} == \
            {node.name for node in nodes}
        # The old fixed window alone was 1.5 s on top of the baseline.
        assert took - baseline < 1.2, (took, baseline)
    finally:
        for node in nodes:
            node.close()
