"""The command line, run as real processes (``python -m zmqfabric ...``) against real nodes on
loopback. Every name is unique to the test (other test runs may share the loopback fabric)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import zmq.auth

import zmqfabric as zf
from tests.procs import ROOT, Child, ProcessGroup
from zmqfabric.security import keys

pytestmark = pytest.mark.slow

#: Bound for one CLI process that should finish on its own (start-up plus discovery).
FINISH_S = 20.0


def finish(child: Child, timeout: float = FINISH_S) -> tuple[int, list[str], list[str]]:
    """Wait for ``child`` to exit; return (exit code, stdout lines, stderr lines)."""
    child.wait(timeout)
    code = child.stop()  # reaps and joins the readers, so every line is in
    lines: list[str] = []
    while True:
        try:
            lines.append(child.readline(timeout=1.0))
        except EOFError:
            return code, lines, child.stderr


def cli_stdin(*args: str, stdin: str,
              timeout: float = FINISH_S) -> subprocess.CompletedProcess[str]:
    """Run the CLI with ``stdin`` as its input (bounded)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "zmqfabric", *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout, env=env, cwd=str(ROOT),
                          check=False)


def assert_one_error_line(stderr: list[str] | str, *words: str) -> None:
    """Exactly one ``error:`` line, naming ``words``; no traceback. (Other lines may be library
    warnings, e.g. about foreign records on the shared loopback fabric.)"""
    lines = stderr.splitlines() if isinstance(stderr, str) else stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    for word in words:
        assert word in errors[0], errors


@pytest.fixture
def service(name: Callable[[str], str]) -> Iterator[tuple[zf.Node, str]]:
    """A node serving a unique service in this process: echoes, or raises for {"fail": ...}."""
    svc = name("echo")
    node = zf.Node(name("svc"))

    @node.reply(svc)
    def echo(body: Any) -> Any:
        if isinstance(body, dict) and "fail" in body:
            raise ValueError(body["fail"])
        return {"echo": body, "by": node.name}

    node.serve_in_background()
    try:
        yield node, svc
    finally:
        node.close()


# --- request/reply -----------------------------------------------------------------------------


def test_req_prints_the_reply(procs: ProcessGroup, service: tuple[zf.Node, str]) -> None:
    node, svc = service
    code, out, err = finish(procs.cli("--json", "req", svc, '{"x": [1, 2]}'))
    assert code == 0, err
    assert json.loads(out[-1]) == {"echo": {"x": [1, 2]}, "by": node.name}


def test_req_reads_json_lines_from_stdin(service: tuple[zf.Node, str]) -> None:
    _, svc = service
    done = cli_stdin("req", svc, "--json", stdin='1\n\n{"a": "b"}\n')
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["echo"] for line in done.stdout.splitlines()] == [1, {"a": "b"}]


def test_remote_error_is_one_line_and_exit_5(procs: ProcessGroup,
                                             service: tuple[zf.Node, str]) -> None:
    _, svc = service
    code, _, err = finish(procs.cli("req", svc, '{"fail": "no thumbnails today"}'))
    assert code == 5
    assert_one_error_line(err, "ValueError", "no thumbnails today")


def test_unknown_service_exits_3_quickly(procs: ProcessGroup, name: Callable[[str], str]) -> None:
    started = time.monotonic()
    code, _, err = finish(procs.cli("--timeout", "0.5", "req", name("nobody"), "{}"))
    assert code == 3
    assert_one_error_line(err, "no node offers service")
    assert time.monotonic() - started < 8.0  # interpreter start-up + 0.5 s, on a busy machine


@pytest.mark.parametrize(
    "args, words",
    [
        (["req", "svc", "{nope"], ["not valid JSON"]),
        (["push", "pipe", "[1, 2"], ["not valid JSON"]),
        (["pub", "st", "topic", "{'single': 'quotes'}"], ["not valid JSON"]),
        (["req", "bad name!", "{}"], ["invalid service name"]),
        (["--timeout", "-1", "ls"], ["--timeout"]),
        (["--interface", "no-such-if0", "ls"], ["no network interface named"]),
        (["run", "not-a-target"], ["MODULE:ATTR"]),
        (["run", "no_such_module_zf:make"], ["cannot import module"]),
        (["--peer", "nonsense", "ls"], ["--peer", "[KEY@]HOST:PORT"]),
        (["--peer", "127.0.0.1:0", "req", "svc", "{}"], ["--peer", "'127.0.0.1:0'"]),
        (["--peer", "host.example:4000", "ls"], ["--peer", "IP address"]),
        (["--peer", "short-key@127.0.0.1:4000", "ls"], ["--peer", "public key"]),
        (["--keys", "/nonexistent/zf-keys", "ls"], ["--keys", "keys generate"]),
        (["--control-port", "70000", "ls"], ["--control-port"]),
        (["device", "pump", "x"], ["queue", "forwarder", "streamer"]),
        (["device", "forwarder", "bad name!"], ["invalid stream name"]),
        (["submit", "t", "{nope"], ["not valid JSON"]),
        (["submit", "t", "--key", "k"], ["--key", "argument"]),
        (["sub", "st", "--via", "Bad_Node"], ["--via"]),
        (["top", "--interval", "0"], ["--interval"]),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(procs: ProcessGroup, args: list[str],
                                                words: list[str]) -> None:
    code, out, err = finish(procs.cli(*args))
    assert code == 2
    assert out == []
    assert_one_error_line(err, *words)


def test_invalid_json_on_stdin_names_the_line(name: Callable[[str], str]) -> None:
    done = cli_stdin("pub", name("st"), "t", "--wait-subscribers", "0", stdin='{"ok": 1}\nnope\n')
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "stdin line 2", "not valid JSON")


# --- pub/sub and pipelines ---------------------------------------------------------------------


def test_pub_sub_round_trip_with_topic_filter(procs: ProcessGroup,
                                              name: Callable[[str], str]) -> None:
    stream = name("prices")
    sub = procs.cli("--json", "sub", stream, "EUR", "--count", "1", "--timeout", "15")
    other = procs.cli("pub", stream, "USDJPY", '{"bid": 150}')  # filtered out by the subscriber
    assert finish(other)[0] == 0
    code, out, err = finish(procs.cli("pub", stream, "EURUSD", '{"bid": 1.1}'))
    assert code == 0, err
    assert out == ["published 1 message on stream %r (topic 'EURUSD', 1 subscriber subscribed)"
                   % stream]
    code, out, err = finish(sub)
    assert code == 0, err
    event = json.loads(out[0])
    assert (event["topic"], event["body"]) == ("EURUSD", {"bid": 1.1})


def test_push_pull_with_count(procs: ProcessGroup, name: Callable[[str], str]) -> None:
    pipeline = name("frames")
    puller = name("puller")
    pull = procs.cli("--name", puller, "--json", "pull", pipeline, "--count", "3",
                     "--timeout", "15")
    code, out, err = finish(procs.cli("push", pipeline, '{"frame": 1}'))
    assert code == 0, err
    assert out == [f"pushed 1 message into pipeline {pipeline!r}"]
    done = cli_stdin("--json", "push", pipeline, stdin='2\n"three"\n')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"pipeline": pipeline, "sent": 2}
    code, out, err = finish(pull)
    assert code == 0, err
    assert [json.loads(line)["body"] for line in out] == [{"frame": 1}, 2, "three"]


def test_a_command_without_a_name_is_listed_as_cli_pid_xxxx(
        procs: ProcessGroup, make_node: Callable[..., zf.Node],
        name: Callable[[str], str]) -> None:
    """A generated name is unique by construction, so the command does not listen for a rival
    of its name before it starts (NodeConfig.claim_window_s=0); its pid is in it."""
    pipeline = name("named")
    pull = procs.cli("pull", pipeline, "--count", "1", "--timeout", "15")
    observer = make_node("observer", advertise=False)
    deadline = time.monotonic() + 10
    offering: list[zf.NodeRecord] = []
    while not offering and time.monotonic() < deadline:
        offering = [r for r in observer.nodes()
                    if r.find(zf.EndpointKind.PIPELINE, pipeline) is not None]
        time.sleep(0.05)
    assert len(offering) == 1, observer.nodes()
    assert re.fullmatch(rf"cli-{pull.proc.pid}-[0-9a-f]{{4}}", offering[0].name), offering[0]
    code, _, err = finish(procs.cli("push", pipeline, "1"))
    assert code == 0, err
    assert finish(pull)[0] == 0


def test_a_negative_claim_window_is_refused() -> None:
    with pytest.raises(zf.LocalProtocolError, match="claim_window_s"):
        zf.NodeConfig(claim_window_s=-1)


def test_pull_count_not_reached_exits_4(procs: ProcessGroup, name: Callable[[str], str]) -> None:
    code, _, err = finish(procs.cli("pull", name("empty"), "--count", "1", "--timeout", "0.3"))
    assert code == 4
    assert "received 0 of 1 messages" in err[-1]


# --- directory and control ---------------------------------------------------------------------


def test_ls_json_lists_a_running_node(procs: ProcessGroup,
                                      make_node: Callable[..., zf.Node]) -> None:
    node = make_node("listed")
    ls = procs.cli("--json", "ls")
    code, out, err = finish(ls)
    assert code == 0, err
    rows = {row["name"]: row for row in map(json.loads, out)}
    assert node.name in rows, out
    row = rows[node.name]
    assert (row["id"], row["pid"], row["address"]) == (node.node_id, os.getpid(), "127.0.0.1")
    assert any(e["kind"] == "ctl" for e in row["endpoints"])
    assert all(row["pid"] != ls.proc.pid for row in rows.values())  # ls is an observer


def test_ls_watch_prints_join_and_leave(procs: ProcessGroup, name: Callable[[str], str]) -> None:
    watch = procs.cli("--json", "ls", "--watch", "--timeout", "30")
    node = zf.Node(name("comer")).start()
    try:
        joined = _expect_event(watch, node.name, "joined")
        assert joined["node"]["id"] == node.node_id
    finally:
        node.close()
    _expect_event(watch, node.name, "left")
    watch.signal(signal.SIGINT)  # Ctrl-C: closes the node, exit 130
    assert watch.wait(10) == 130


def _expect_event(watch: Child, node: str, change: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        event: dict[str, Any] = json.loads(watch.readline(max(0.1, deadline - time.monotonic())))
        if event["node"]["name"] == node and event["event"] == change:
            return event


def test_ping_and_stats(procs: ProcessGroup, make_node: Callable[..., zf.Node]) -> None:
    node = make_node("pinged")
    code, out, err = finish(procs.cli("ping", node.name, "--count", "2"))
    assert code == 0, err
    assert len(out) == 2 and all(line.startswith(f"{node.name} (host ") for line in out), out
    assert all(line.endswith(" ms") for line in out)
    code, out, err = finish(procs.cli("--json", "stats", node.name))
    assert code == 0, err
    stats = json.loads(out[0])
    assert (stats["node"], stats["pid"]) == (node.name, os.getpid())
    assert isinstance(stats["counters"], dict)


def test_ping_unknown_node_exits_3(procs: ProcessGroup, name: Callable[[str], str]) -> None:
    code, _, err = finish(procs.cli("ping", name("ghost"), "--timeout", "0.3"))
    assert code == 3
    assert_one_error_line(err, "no node named")


# --- run -----------------------------------------------------------------------------------------


NODE_MODULE = """
import zmqfabric as zf

def make(name: str) -> zf.Node:
    node = zf.Node(name)

    @node.reply({service!r})
    def whoami(body):
        return node.name

    return node

fixed = make("fixed-node-name")
"""


def test_run_one_definition_twice_under_two_names(
    procs: ProcessGroup, name: Callable[[str], str], tmp_path: Path
) -> None:
    service = name("whoami")
    module = f"zf_nodes_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(NODE_MODULE.format(service=service)))
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    names = [name("inst"), name("inst")]
    runs = [procs.cli("run", f"{module}:make", "--name", n, env=env) for n in names]
    for run, node_name in zip(runs, names, strict=True):
        assert run.expect("ready: ", timeout=15).startswith(f"node {node_name} ")
    answered: set[str] = set()
    with zf.Node(name("caller"), advertise=False) as caller:
        for node_name in names:
            caller.wait_for_node(node_name, 10)
        deadline = time.monotonic() + 10
        while answered != set(names) and time.monotonic() < deadline:
            answered.add(caller.request(service, None, timeout=5))  # round robin
    assert answered == set(names)
    for run in runs:
        run.signal(signal.SIGTERM)  # a service manager's stop: clean, exit 0
        assert run.wait(10) == 0
        assert run.expect("stopped: ", timeout=5).startswith("node ")

    code, _, err = finish(procs.cli("run", f"{module}:fixed", "--name", "other", env=env))
    assert code == 2
    assert_one_error_line(err, "fixed-node-name", "def fixed(name: str) -> Node")


# --- keys --------------------------------------------------------------------------------------


def cli_run(*args: str, stdin: str = "") -> tuple[int, list[str], str]:
    """Run the CLI to completion (bounded); return (exit code, stdout lines, stderr)."""
    done = cli_stdin(*args, stdin=stdin)
    return done.returncode, done.stdout.splitlines(), done.stderr


def test_keys_generate_show_allow(tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    code, out, err = cli_run("keys", "generate", str(keydir))
    assert code == 0, err
    assert len(out) == 1 and keys.is_public_key(out[0]), out
    public = out[0]
    secret_file = keydir / "node.key_secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    _, secret = zmq.auth.load_certificate(str(secret_file))
    assert secret is not None and secret.decode() not in "\n".join(out) + err  # never printed

    code, out, err = cli_run("keys", "generate", str(keydir))  # no silent overwrite
    assert (code, out) == (2, [])
    assert_one_error_line(err, "exists", "--force")
    assert keys.show(keydir) == public
    code, out, err = cli_run("--keys", str(keydir), "keys", "generate", "--force")  # DIR: --keys
    assert code == 0, err
    assert out[0] != public and keys.show(keydir) == out[0]
    public = out[0]

    code, out, err = cli_run("--keys", str(keydir), "keys", "show")
    assert (code, out) == (0, [public]), err

    other = keys.generate(tmp_path / "other")
    code, out, err = cli_run("keys", "allow", other, "--label", "peer-1", str(keydir))
    assert (code, out) == (0, [f"allowed peer-1: {other}"]), err
    code, out, err = cli_run("--json", "keys", "show", str(keydir))
    assert code == 0, err
    assert json.loads(out[0]) == {"directory": str(keydir), "public": public,
                                  "allowed": [{"label": "peer-1", "key": other}]}
    assert keys.load(keydir).allows(other)  # a node started with DIR accepts it

    code, out, err = cli_run("keys", "allow", public, "--label", "peer-1", str(keydir))
    assert (code, out) == (2, [])
    assert_one_error_line(err, "holds another key", "--force")
    for junk, words in [("not-a-key", ["neither a Z85 public key nor a certificate file"]),
                        (str(tmp_path / "missing.key"), ["neither a Z85 public key"])]:
        code, out, err = cli_run("keys", "allow", junk, "--label", "x", str(keydir))
        assert (code, out) == (2, [])
        assert_one_error_line(err, *words)
    code, _, err = cli_run("keys", "allow", other, "--label", "bad label!", str(keydir))
    assert code == 2
    assert_one_error_line(err, "label")
    code, _, err = cli_run("keys", "show", str(tmp_path / "none"))
    assert code == 2
    assert_one_error_line(err, "no node key", "keys generate")


# --- secured nodes -----------------------------------------------------------------------------


def test_secured_req_with_keys_and_ls_marks_secured(tmp_path: Path,
                                                     name: Callable[[str], str]) -> None:
    keydir = tmp_path / "keys"
    public = keys.generate(keydir)
    svc = name("secret-echo")
    node = zf.Node(name("secured"), keys=str(keydir))

    @node.reply(svc)
    def echo(body: Any) -> Any:
        return {"echo": body}

    node.serve_in_background()
    try:
        code, out, err = cli_run("--keys", str(keydir), "--json", "req", svc, '{"x": 1}')
        assert code == 0, err
        assert json.loads(out[0]) == {"echo": {"x": 1}}

        code, out, err = cli_run("--keys", str(keydir), "--json", "ls")
        assert code == 0, err
        rows = {row["name"]: row for row in map(json.loads, out)}
        assert rows[node.name]["secured"] is True and rows[node.name]["key"] == public
        assert rows[node.name]["refused"] is None

        # Without keys the secured node is refused: listed as such, and not called.
        code, out, err = cli_run("--json", "ls")
        assert code == 0, err
        rows = {row["name"]: row for row in map(json.loads, out)}
        assert "secured" in rows[node.name]["refused"], rows.get(node.name)
        code, out, err = cli_run("--timeout", "1", "req", svc, "{}")
        assert (code, out) == (3, [])
        assert_one_error_line(err, svc)
    finally:
        node.close()


def test_run_refuses_a_node_made_without_the_keys_asked_for(
    tmp_path: Path, name: Callable[[str], str]
) -> None:
    keydir = tmp_path / "keys"
    keys.generate(keydir)
    module = f"zf_plain_{os.getpid()}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(NODE_MODULE.format(service="x")))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    done = subprocess.run([sys.executable, "-m", "zmqfabric", "--keys", str(keydir), "run",
                           f"{module}:make", "--name", name("plain")], capture_output=True,
                          text=True, timeout=FINISH_S, env=env, cwd=str(ROOT), check=False)
    assert done.returncode == 2
    assert_one_error_line(done.stderr, "--keys was given", "keys=None")


# --- devices -----------------------------------------------------------------------------------


def test_device_forwarder_relays_to_sub_via(procs: ProcessGroup,
                                           name: Callable[[str], str]) -> None:
    stream = name("ticks")
    device = procs.cli("device", "forwarder", stream)
    ready = device.expect("ready: ", timeout=15)
    via = f"forwarder-{stream}"
    assert f"stream {stream!r}" in ready and f"via={via}" in ready, ready
    sub = procs.cli("--json", "sub", stream, "EUR", "--via", via, "--count", "1",
                    "--timeout", "15")
    with zf.Node(name("ticker")) as node:
        publisher = node.publisher(stream)
        # The CLI subscriber, counted through the forwarder once its subscription (EUR, then
        # its marker) has travelled up to here; the forwarder itself does not count.
        assert publisher.wait_subscribers(1, 10) == 1
        deadline = time.monotonic() + 15
        line = None
        while line is None and time.monotonic() < deadline:
            publisher.send("USD", {"skip": True})  # filtered out upstream
            publisher.send("EURUSD", {"bid": 1.1})
            try:
                line = sub.readline(timeout=0.1)  # until the CLI subscriber prints the event
            except TimeoutError:
                pass
    assert line is not None, sub.err_tail()
    event = json.loads(line)
    assert (event["topic"], event["body"]) == ("EURUSD", {"bid": 1.1})
    assert sub.wait(10) == 0
    device.signal(signal.SIGINT)  # Ctrl-C: clean shutdown, exit 130
    assert device.wait(10) == 130
    assert device.expect("stopped: ", timeout=5).startswith(f"forwarder for stream {stream!r}")


def _echo_node(node_name: str, svc: str) -> zf.Node:
    node = zf.Node(node_name)

    @node.reply(svc)
    def echo(body: Any) -> Any:
        return {"echo": body, "by": node.name}

    node.serve_in_background()
    return node


def test_device_queue_serves_req_via(procs: ProcessGroup, name: Callable[[str], str]) -> None:
    svc, via = name("lb-echo"), name("lb")
    device = procs.cli("--json", "device", "queue", svc, "--name", via)
    ready = device.json_line(timeout=15)
    assert (ready["event"], ready["device"], ready["via"]) == ("ready", "queue", via)
    node = _echo_node(name("behind-lb"), svc)  # after the device
    try:
        code, out, err = finish(procs.cli("--json", "req", svc, '"hi"', "--via", via))
        assert code == 0, err
        assert json.loads(out[0]) == {"echo": "hi", "by": node.name}
    finally:
        node.close()
    device.signal(signal.SIGTERM)  # a service manager's stop: exit 0
    assert device.wait(10) == 0
    code, _, err = finish(procs.cli("--timeout", "0.3", "req", svc, "1", "--via", name("no")))
    assert code == 3
    assert_one_error_line(err, "no node named")


def test_device_queue_started_after_its_service(procs: ProcessGroup,
                                                 service: tuple[zf.Node, str],
                                                 name: Callable[[str], str]) -> None:
    _, svc = service
    via = name("late-lb")
    with zf.Node(name("waiter"), advertise=False) as waiter:
        waiter.wait_for_endpoint("rep", svc, 10)  # the service is known to the fabric first
    device = procs.cli("--json", "device", "queue", svc, "--name", via)
    assert device.json_line(timeout=15)["event"] == "ready"
    code, _, err = finish(procs.cli("--timeout", "2", "--json", "req", svc, "1", "--via", via))
    assert code == 0, err


# --- top ---------------------------------------------------------------------------------------


def test_top_count_1_json_shows_a_node(procs: ProcessGroup,
                                       make_node: Callable[..., zf.Node]) -> None:
    node = make_node("topped")
    code, out, err = finish(procs.cli("--json", "top", "--count", "1"))
    assert code == 0, err
    rows = {row["node"]: row for row in map(json.loads, out)}
    row = rows[node.name]
    assert (row["refresh"], row["pid"], row["id"]) == (1, os.getpid(), node.node_id)
    assert isinstance(row["counters"], dict) and row["endpoints"]


# --- submit ------------------------------------------------------------------------------------


@pytest.fixture
def worker(name: Callable[[str], str]) -> Iterator[tuple[zf.Node, str]]:
    """A node working on a unique task: returns {"done": body}, raises for "boom"."""
    task = name("job")
    node = zf.Node(name("worker"))

    @node.task(task)
    def work(body: Any) -> Any:
        if body == "boom":
            raise ValueError("boom today")
        return {"done": body}

    node.serve_in_background()
    try:
        yield node, task
    finally:
        node.close()


def test_submit_wait_prints_each_result(procs: ProcessGroup,
                                        worker: tuple[zf.Node, str]) -> None:
    _, task = worker
    code, out, err = finish(procs.cli("--json", "submit", task, '{"n": 1}', "--wait"))
    assert code == 0, err
    result = json.loads(out[0])
    assert (result["task"], result["ok"], result["result"]) == (task, True, {"done": {"n": 1}})

    done = cli_stdin("--json", "submit", task, "--wait", "--max-attempts", "1",
                     stdin='2\n"boom"\n')
    assert done.returncode == 5, done.stderr
    results = {json.dumps(r.get("result")): r for r in map(json.loads, done.stdout.splitlines())}
    assert results['{"done": 2}']["ok"] is True
    failed = results["null"]
    assert failed["ok"] is False and failed["error"]["type"] == "ValueError"
    assert_one_error_line(done.stderr, "ValueError", "boom today", "1 of 2 tasks failed")


def test_submit_without_a_worker_exits_3(procs: ProcessGroup, name: Callable[[str], str]) -> None:
    code, _, err = finish(procs.cli("--timeout", "0.3", "submit", name("nobody"), "{}"))
    assert code == 3
    assert_one_error_line(err, "no node offers task")
