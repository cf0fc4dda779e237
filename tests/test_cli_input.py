"""Whatever the user or a remote node hands the CLI, it ends in one clear line: bad bodies on
stdin exit 2 without a traceback, and strings from the network reach the terminal with their
control characters escaped. Real CLI processes against real nodes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable

import pytest

import zmqfabric as zf
from tests.procs import ROOT, ProcessGroup
from tests.test_cli import FINISH_S, assert_one_error_line, cli_stdin, finish

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("stdin", "words"),
    [
        (b"\xff\xfe{}\n", ["stdin line 1", "not UTF-8"]),
        (b"[" * 5000 + b"]" * 5000 + b"\n", ["stdin line 1", "deeper than 100"]),
        (b"[" * 101 + b"]" * 101 + b"\n", ["stdin line 1", "deeper than 100"]),
        (b"1" * 5000 + b"\n", ["stdin line 1", "more than 4300 digits"]),
        (b"18446744073709551616\n", ["stdin line 1", "beyond 64 bits"]),
        (b"-9223372036854775809\n", ["stdin line 1", "beyond 64 bits"]),
        (b"", ["stdin was empty"]),
        (b"\n  \n", ["stdin was empty"]),
    ],
    ids=["not-utf8", "deep-5000", "deep-101", "5000-digits", "2**64", "below-int64", "empty",
         "blank"],
)
def test_a_bad_body_on_stdin_is_one_line_and_exit_2(stdin: bytes, words: list[str],
                                                    name: Callable[[str], str]) -> None:
    assert_refused(["req", name("svc")], stdin, words)


def test_pub_refuses_bad_bodies_too(name: Callable[[str], str]) -> None:
    args = ["pub", name("st"), "t", "--wait-subscribers", "0"]
    assert_refused(args, b"\xff\n", ["stdin line 1", "not UTF-8"])
    assert_refused(args, b"", ["stdin was empty"])


def assert_refused(args: list[str], stdin: bytes, words: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "zmqfabric", *args], input=stdin,
                          capture_output=True, timeout=FINISH_S, env=env, cwd=str(ROOT),
                          check=False)
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, stderr
    assert_one_error_line(stderr, *words)


def test_a_body_nested_exactly_100_deep_is_sent(procs: ProcessGroup,
                                                name: Callable[[str], str]) -> None:
    stream = name("deep")
    body = "[" * 99 + "1" + "]" * 99
    done = cli_stdin("pub", stream, "t", "--wait-subscribers", "0", stdin=body + "\n")
    assert done.returncode == 0, done.stderr


def test_a_closed_stdin_is_one_line_and_exit_2(name: Callable[[str], str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -m zmqfabric req {name("svc")} '
                                       "<&-"], capture_output=True, text=True, timeout=FINISH_S,
                          env=env, cwd=str(ROOT), check=False)
    assert done.returncode == 2, done.stderr
    assert_one_error_line(done.stderr, "stdin is closed")


def test_a_remote_topic_cannot_write_escape_sequences(procs: ProcessGroup,
                                                      make_node: Callable[..., zf.Node],
                                                      name: Callable[[str], str]) -> None:
    stream = name("esc")
    sub = procs.cli("sub", stream, "--count", "1", "--timeout", "15")
    node = make_node("evil")
    pub = node.publisher(stream)
    assert pub.wait_subscribers(1, timeout=15.0) == 1
    pub.send("\x1b[2J\x1b]0;owned\x07\u202etopic", {"text": "\x1b[31mred\x85"})
    code, out, err = finish(sub)
    assert code == 0, err
    assert len(out) == 1, out
    assert "\x1b" not in out[0] and "\x85" not in out[0] and "\u202e" not in out[0], out
    topic, body = out[0].split("  ", 1)
    assert topic == "\\x1b[2J\\x1b]0;owned\\x07\\u202etopic"
    assert json.loads(body) == {"text": "\x1b[31mred\x85"}  # the same value, escaped in JSON
