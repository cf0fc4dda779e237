"""Process plumbing shared by ``perf/latency.py`` and ``perf/throughput.py``.

Every case has two halves: a *bind* half (echo service, publisher, puller) and a *connect* half
(requester, subscriber, pusher). Halves are plain functions ``half(env, case, announce, stop)``
run in a thread of a worker process:

- raw halves run in a **raw worker**: a child process (``SCRIPT worker``) that imports no fabric
  node at all, so the raw baseline pays for no zeroconf or control thread;
- fabric halves run in the process that owns a :class:`zmqfabric.Node`: the server (``SCRIPT
  serve --name X``) or the probe (``SCRIPT probe X``, or the default local run, which starts a
  server itself). The fabric's background threads are part of the fabric's cost.

The probe finds the server by discovery (its ``X-ctl`` reply service) and drives the server's
halves over that service; the server forwards raw halves to its raw worker as JSON lines. ipc
cases need both on one host; inproc cases run both halves in one local process.

Over tcp the fabric binds and connects exactly as users see it (scope address, discovery). For
ipc and inproc the fabric has no public hook, so :func:`fabric_expose` / :func:`fabric_connect`
bind one more address on the handle's own socket and apply a connect in the owning thread (the
same private step discovery takes); over tcp they fall back to that when discovery is too
slow. Messages still go through the handles' real send/receive code; only the address differs.

Everything is bounded: workers die on SIGALRM after ``--max-seconds``, every wait has a timeout,
and every child is stopped with quit, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket as pysocket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from zmqfabric.constants import HWM, ZERO_COPY_THRESHOLD  # noqa: E402

#: Seconds a worker process may live at most (SIGALRM ends it even if its parent vanished).
WORKER_MAX_S = 3600
#: Seconds for a half to set up (bind, connect, wait for discovery).
SETUP_TIMEOUT_S = 20.0
#: Seconds a fabric half waits for discovery to show a new endpoint before connecting directly.
DISCOVERY_WAIT_S = 5.0
#: Seconds the probe waits to find the server by discovery.
FIND_TIMEOUT_S = 20.0
#: Attempts per run: a run that fails (say, a discovery update lost on a loaded host) is retried.
RUN_ATTEMPTS = 3
#: Closing the probe's node or a worker takes at most this long (s) before the probe gives up.
CLOSE_TIMEOUT_S = 15.0
#: How long a child gets to quit before SIGTERM, and after SIGTERM before SIGKILL.
QUIT_GRACE_S = 5.0

Announce = Callable[[dict[str, Any]], None]
Half = Callable[["Env", dict[str, Any], Announce, threading.Event], dict[str, Any]]


# --- per-process environment and transports ----------------------------------------------------


class Env:
    """What a half gets from its process: the implementation, a context for raw sockets, the
    fabric node (fabric processes only), the bind address and a private ipc directory."""

    def __init__(self, impl: str, address: str, ipc_dir: str, node: Any = None) -> None:
        self.impl = impl
        self.address = address
        self.ipc_dir = ipc_dir
        self.node = node
        self.ctx = zmq.Context()

    def socket(self, kind: int) -> zmq.Socket:
        """A raw socket with the fabric's queue limits (same HWM on both sides of a comparison)."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
        return sock

    def bind(self, sock: zmq.Socket, transport: str, tag: str) -> str:
        """Bind ``sock`` on ``transport``; return the URL a peer connects to."""
        url = self.url(transport, tag)
        sock.bind(url)
        return sock.getsockopt(zmq.LAST_ENDPOINT).decode() if transport == "tcp" else url

    def url(self, transport: str, tag: str) -> str:
        if transport == "tcp":
            return f"tcp://{self.address}:*"
        if transport == "ipc":
            return f"ipc://{self.ipc_dir}/{tag}.ipc"
        if transport == "inproc":
            return f"inproc://zfperf-{tag}"
        raise ValueError(f"unknown transport {transport!r}")

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def fabric_expose(env: Env, handle: Any, transport: str, tag: str) -> dict[str, Any]:
    """Where a fabric bind-side handle can be reached: its advertised name, and a URL. tcp: the
    port the fabric bound (used only if discovery is too slow, see :func:`fabric_connect`).
    ipc/inproc: one more address bound on the handle's socket (the perf hook; call in the
    handle's owning thread)."""
    if transport == "tcp":
        return {"name": handle.name, "url": f"tcp://{env.address}:{handle.port}"}
    url = env.url(transport, tag)
    handle._sock.bind(url)
    return {"name": handle.name, "url": url}


def fabric_connect(
    env: Env, factory: Callable[[str], Any], kind: str, info: dict[str, Any], transport: str
) -> tuple[Any, bool]:
    """A fabric connect-side handle (``factory`` is ``node.requester``, ``node.subscribe`` or
    ``node.pusher``) and whether discovery was bypassed. Over tcp the handle is made for the
    real name and discovery connects it, as for any user; if discovery has not seen the endpoint
    within DISCOVERY_WAIT_S (seen on a host crowded with test nodes: the browser thread stuck
    resolving other records), and always over ipc/inproc, the handle gets a name nobody
    advertises and the connect step discovery would take is applied to the bind side's URL
    (the perf hook). Either way messages go through the handle's own send/receive code."""
    if transport == "tcp":
        try:
            env.node.wait_for_endpoint(kind, info["name"], DISCOVERY_WAIT_S)
            return factory(info["name"]), False
        except Exception:  # NoProviderError: fall back below
            print(
                f"perf: discovery did not show {kind} {info['name']} within {DISCOVERY_WAIT_S} s;"
                " connecting to it directly",
                file=sys.stderr,
                flush=True,
            )
    handle = factory(f"{info['name'][:50]}-via-{transport}")
    handle._apply("connect", info["url"])  # the owner thread: this one
    return handle, transport == "tcp"


def payload(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


def raw_is_binary(size: int) -> bool:
    """The raw programs mirror the fabric's rule: bytes bodies of at least the zero-copy threshold
    travel as they are (no msgpack, no copy); smaller ones are msgpack-packed and unpacked."""
    return size >= ZERO_COPY_THRESHOLD


# --- running halves in threads -------------------------------------------------------------------


class _Job:
    def __init__(self, half: Half, env: Env, case: dict[str, Any]) -> None:
        self.half, self.env, self.case = half, env, case
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.info: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"perf-{case.get('half')}")

    def _announce(self, info: dict[str, Any]) -> None:
        self.info = info
        self.ready.set()

    def _run(self) -> None:
        try:
            self.result = self.half(self.env, self.case, self._announce, self.stop)
        except BaseException:
            self.error = traceback.format_exc(limit=8)
        finally:
            self.ready.set()


class Worker(Protocol):
    def start(self, half: str, case: dict[str, Any]) -> tuple[int, dict[str, Any]]: ...
    def finish(self, job: int, stop: bool, timeout: float) -> dict[str, Any]: ...
    def close(self) -> None: ...


class Runner:
    """Runs halves in threads of this process; the in-process :class:`Worker`."""

    def __init__(self, env: Env, halves: dict[str, Half]) -> None:
        self.env = env
        self._halves = halves
        self._jobs: dict[int, _Job] = {}
        self._next = 0

    def start(self, half: str, case: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Start ``half`` and return (job id, what it announced) once it is set up."""
        if half not in self._halves:
            raise RuntimeError(
                f"this process has no half {half!r}: serve and probe with the same script "
                f"(latency.py serve for latency.py probe, throughput.py serve for throughput.py)"
            )
        job = _Job(self._halves[half], self.env, dict(case, half=half))
        self._next += 1
        self._jobs[self._next] = job
        job.thread.start()
        if not job.ready.wait(SETUP_TIMEOUT_S):
            job.stop.set()
            raise RuntimeError(f"{half} ({self.env.impl}) did not set up in {SETUP_TIMEOUT_S} s")
        if job.error:
            job.thread.join(QUIT_GRACE_S)
            raise RuntimeError(f"{half} ({self.env.impl}) failed:\n{job.error}")
        return self._next, job.info

    def finish(self, job_id: int, stop: bool, timeout: float) -> dict[str, Any]:
        """Wait for job ``job_id`` (telling it to stop first if ``stop``); return its result."""
        job = self._jobs.pop(job_id)
        if stop:
            job.stop.set()
        job.thread.join(timeout)
        if job.thread.is_alive():
            job.stop.set()
            job.thread.join(QUIT_GRACE_S)
            raise RuntimeError(
                f"{job.case['half']} ({self.env.impl}) still running after {timeout} s"
            )
        if job.error:
            raise RuntimeError(f"{job.case['half']} ({self.env.impl}) failed:\n{job.error}")
        assert job.result is not None
        return job.result

    def close(self) -> None:
        for job in self._jobs.values():
            job.stop.set()
        for job in self._jobs.values():
            job.thread.join(QUIT_GRACE_S)
        self._jobs.clear()


def dispatch(worker: Worker, cmd: dict[str, Any]) -> dict[str, Any]:
    """One command of the worker/ctl protocol (JSON-able dicts) -> its reply."""
    try:
        if cmd["op"] == "start":
            job, info = worker.start(cmd["half"], cmd["case"])
            return {"ok": True, "job": job, "info": info}
        if cmd["op"] == "finish":
            return {"ok": True, "result": worker.finish(cmd["job"], cmd["stop"], cmd["timeout"])}
        return {"ok": False, "error": f"unknown op {cmd['op']!r}"}
    except Exception as exc:  # reported to the driver, which stops the run
        return {"ok": False, "error": str(exc)}


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "unknown error"))
    return reply


class ChildWorker:
    """A raw worker child process driven by JSON lines on its stdin/stdout."""

    def __init__(self, script: str, address: str, label: str) -> None:
        self.label = label
        self.proc = subprocess.Popen(
            [sys.executable, script, "worker", "--address", address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(ROOT),
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"perf-read-{label}")
        self._reader.start()
        self._lock = threading.Lock()
        _checked(self._call({"op": "hello"}, SETUP_TIMEOUT_S))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(
                    f"{self.label}: no answer to {cmd['op']} in {timeout} s"
                ) from None
            if line is None:
                raise RuntimeError(f"{self.label}: worker exited (rc {self.proc.poll()})")
            return json.loads(line)

    def start(self, half: str, case: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        reply = _checked(
            self._call({"op": "start", "half": half, "case": case}, SETUP_TIMEOUT_S + 5)
        )
        return reply["job"], reply["info"]

    def finish(self, job: int, stop: bool, timeout: float) -> dict[str, Any]:
        cmd = {"op": "finish", "job": job, "stop": stop, "timeout": timeout}
        return _checked(self._call(cmd, timeout + QUIT_GRACE_S + 5))["result"]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self._call({"op": "quit"}, QUIT_GRACE_S)
        except (RuntimeError, OSError, ValueError):
            pass
        stop_process(self.proc)
        self._reader.join(QUIT_GRACE_S)


def worker_main(halves: dict[str, Half], address: str) -> None:
    """``SCRIPT worker``: run raw halves as told on stdin (one JSON command a line)."""
    signal.alarm(WORKER_MAX_S)
    env = Env("raw", address, tempfile.mkdtemp(prefix="zfperf-raw-", dir="/tmp"))
    runner = Runner(env, halves)
    out = sys.stdout
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                out.write(json.dumps({"ok": True}) + "\n")
                out.flush()
                break
            reply = {"ok": True} if cmd["op"] == "hello" else dispatch(runner, cmd)
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        runner.close()
        env.close()
        shutil.rmtree(env.ipc_dir, ignore_errors=True)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """Wait for ``proc`` briefly, then SIGTERM, then SIGKILL; always reaped."""
    for step in (None, proc.terminate, proc.kill):
        if step is not None and proc.poll() is None:
            step()
        try:
            proc.wait(QUIT_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the server ------------------------------------------------------------------------------


def ctl_name(server: str) -> str:
    return f"{server}-ctl"


def echo_name(node_name: str) -> str:
    return f"{node_name}-echo"


def _echo(body: Any) -> Any:
    return body


def open_fabric(
    name: str, ipc_dir: str, ctl: Callable[[Any], Any] | None = None
) -> tuple[Any, Env]:
    """A started node ``name`` with an echo service (plus ``name-ctl`` if given) and the Env of its
    fabric halves. The echo service also listens on ipc and inproc (the perf hook)."""
    import zmqfabric as zf

    node = zf.Node(name)
    node.reply(echo_name(name))(_echo)
    if ctl is not None:
        node.reply(ctl_name(name))(ctl)
    node.start()
    env = Env("fabric", node.config.scope.address, ipc_dir, node)
    service = node._services[echo_name(name)]  # the perf hook: bind in the owner, before serving
    for transport in ("ipc", "inproc"):
        service.socket.bind(env.url(transport, f"{name}-echo"))
    return node, env


def echo_info(env: Env, transport: str) -> dict[str, Any]:
    """Where this process's fabric echo service is reached over ``transport``."""
    name = env.node.name
    if transport == "tcp":
        port = env.node._services[echo_name(name)].port
        return {"name": echo_name(name), "url": f"tcp://{env.address}:{port}"}
    return {"name": echo_name(name), "url": env.url(transport, f"{name}-echo")}


def serve_main(script: str, name: str, halves: dict[str, Half], max_seconds: float) -> None:
    """``SCRIPT serve --name NAME``: the remote side of every case until quit, SIGINT/SIGTERM or
    ``max_seconds``. Raw halves go to a raw worker child; fabric halves run here."""
    ipc_dir = tempfile.mkdtemp(prefix=f"zfperf-{name}-", dir="/tmp")
    state: dict[str, Any] = {}

    def ctl(body: dict[str, Any]) -> dict[str, Any]:
        op = body.get("op")
        if op == "hello":
            return {
                "ok": True,
                "host": pysocket.gethostname(),
                "pid": os.getpid(),
                "ipc_dir": ipc_dir,
                "node": name,
            }
        if op == "quit":
            state["node"].stop()
            return {"ok": True}
        return dispatch(state["raw"] if body.get("impl") == "raw" else state["runner"], body)

    node, env = open_fabric(name, ipc_dir, ctl)
    state["node"] = node
    state["runner"] = Runner(env, halves)
    try:
        state["raw"] = ChildWorker(script, env.address, f"{name}-raw")
        print(
            f"perf server {name!r} ready (pid {os.getpid()}); probe it with: "
            f"python3 {os.path.relpath(script, ROOT)} probe {name}",
            file=sys.stderr,
            flush=True,
        )
        node.run(timeout=max_seconds)
    finally:
        state["runner"].close()
        if "raw" in state:
            state["raw"].close()
        node.close()
        env.close()
        shutil.rmtree(ipc_dir, ignore_errors=True)


class RemoteWorker:
    """The server's raw or fabric halves, driven over its ``ctl`` reply service."""

    def __init__(self, node: Any, server: str, impl: str) -> None:
        self._node, self._service, self._impl = node, ctl_name(server), impl

    def _call(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        return _checked(
            self._node.request(self._service, dict(body, impl=self._impl), timeout=timeout)
        )

    def start(self, half: str, case: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        reply = self._call({"op": "start", "half": half, "case": case}, SETUP_TIMEOUT_S + 10)
        return reply["job"], reply["info"]

    def finish(self, job: int, stop: bool, timeout: float) -> dict[str, Any]:
        body = {"op": "finish", "job": job, "stop": stop, "timeout": timeout}
        return self._call(body, timeout + QUIT_GRACE_S + 10)["result"]

    def close(self) -> None:
        pass


class Session:
    """The probe's view: local and remote workers for each implementation.

    ``Session.local(script, ...)`` starts a server process on this host first (the default run);
    ``Session.remote(script, server)`` finds a running one by discovery (two-host mode).
    """

    def __init__(
        self, script: str, server: str, halves: dict[str, Half], spawn: bool, max_seconds: float
    ) -> None:
        self.server = server
        self.stuck = False
        self._spawned: subprocess.Popen[Any] | None = None
        self._ipc_dir = tempfile.mkdtemp(prefix="zfperf-probe-", dir="/tmp")
        self._closers: list[Callable[[], None]] = []
        try:
            if spawn:
                self._spawned = subprocess.Popen(
                    [
                        sys.executable,
                        script,
                        "serve",
                        "--name",
                        server,
                        "--max-seconds",
                        str(int(max_seconds)),
                    ],
                    stdin=subprocess.DEVNULL,
                    cwd=str(ROOT),
                )
            me = f"{server[:30]}-p{os.getpid() % 100000}"
            self.node, env = open_fabric(me, self._ipc_dir)
            self._closers.append(self.node.close)
            self._closers.append(env.close)
            self.node.serve_in_background()
            self.env = env
            self.node.wait_for_endpoint("rep", ctl_name(server), FIND_TIMEOUT_S)
            self.hello = _checked(self.node.request(ctl_name(server), {"op": "hello"}, timeout=10))
            same_host = self.hello["host"] == pysocket.gethostname()
            self.ipc_ok = same_host and os.path.isdir(self.hello["ipc_dir"])
            raw = ChildWorker(script, env.address, "probe-raw")
            self._closers.insert(0, raw.close)
            fabric = Runner(env, halves)
            self._closers.insert(0, fabric.close)
            self.local: dict[str, Worker] = {"raw": raw, "fabric": fabric}
            self.remote: dict[str, Worker] = {
                impl: RemoteWorker(self.node, server, impl) for impl in ("raw", "fabric")
            }
        except BaseException:
            self.close()
            raise

    def workers(self, impl: str, transport: str) -> tuple[Worker, Worker]:
        """(bind-side worker, connect-side worker) for a case."""
        if transport == "inproc":
            return self.local[impl], self.local[impl]
        return self.remote[impl], self.local[impl]

    def close(self) -> None:
        """Stop the spawned server and the workers first, then close the node (bounded: a stuck
        discovery thread must not keep the probe, or its children, alive)."""
        if self._spawned is not None and getattr(self, "node", None) is not None:
            try:
                self.node.request(ctl_name(self.server), {"op": "quit"}, timeout=5)
            except Exception:
                pass
        if self._spawned is not None:
            stop_process(self._spawned)
        for close in self._closers:
            closer = threading.Thread(target=_quietly, args=(close,), name="perf-close")
            closer.start()
            closer.join(CLOSE_TIMEOUT_S)
            if closer.is_alive():
                self.stuck = True
                print(
                    f"perf: {getattr(close, '__qualname__', close)} did not return in "
                    f"{CLOSE_TIMEOUT_S} s",
                    file=sys.stderr,
                    flush=True,
                )
        self._closers.clear()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        traceback.print_exc()


def run_pair(
    session: Session,
    impl: str,
    transport: str,
    bind_half: str,
    connect_half: str,
    case: dict[str, Any],
    measured_by: str,
    timeout: float,
) -> tuple[dict, dict]:
    """Run one case for one implementation: start the bind half, then the connect half with the
    bind half's endpoints; wait for the half that measures (``measured_by``: "bind" or
    "connect") to end by itself, then stop the other one (a sender keeps its socket open until
    then, so nothing queued is lost at close). Returns (bind result, connect result)."""
    bind_w, connect_w = session.workers(impl, transport)
    case = dict(case, impl=impl, transport=transport)
    bjob, info = bind_w.start(bind_half, case)
    results: dict[str, dict[str, Any]] = {}
    try:
        cjob, _ = connect_w.start(connect_half, dict(case, peer=info))
    except BaseException:
        bind_w.finish(bjob, True, timeout)
        raise
    jobs = {"bind": (bind_w, bjob), "connect": (connect_w, cjob)}
    other = "bind" if measured_by == "connect" else "connect"
    try:
        worker, job = jobs[measured_by]
        results[measured_by] = worker.finish(job, False, timeout)
    finally:
        worker, job = jobs[other]
        results[other] = worker.finish(job, True, timeout)
    return results["bind"], results["connect"]


# --- the command line shared by latency.py and throughput.py ------------------------------------


class Bench(Protocol):
    """What a bench script provides to :func:`make_cli`."""

    name: str
    patterns: tuple[str, ...]
    halves: dict[str, Half]

    def plan_case(self, pattern: str, transport: str, size: int, quick: bool) -> dict[str, Any]: ...
    def pair(self, pattern: str) -> tuple[str, str, str]: ...
    def figures(self, case: dict[str, Any], bind: dict, connect: dict) -> dict[str, float]: ...
    def targets(self, rows: list[Any]) -> list[tuple[str, float | None, str, bool | None]]: ...


def drive(session: Session, bench: Bench, opts: dict[str, Any]) -> list[Any]:
    """Run the matrix: per case, raw and fabric alternate; headline cases run ``runs`` times."""
    import common

    quick = opts["quick"]
    sizes = common.parse_sizes(opts["sizes"], quick)
    transports = common.parse_list(opts["transports"], common.TRANSPORTS, common.TRANSPORTS)
    patterns = common.parse_list(opts["patterns"], bench.patterns, bench.patterns)
    if "ipc" in transports and not session.ipc_ok:
        common.note(f"server {session.server} is on another host: skipping ipc")
        transports = tuple(t for t in transports if t != "ipc")
    rows = []
    case_id = 0
    for pattern in patterns:
        bind_half, connect_half, measured_by = bench.pair(pattern)
        for transport in transports:
            for size in sizes:
                skip = getattr(bench, "skip", lambda *_: None)(pattern, transport, size)
                if skip:
                    common.note(f"{bench.name} {pattern} {transport} {size}: skipped ({skip})")
                    continue
                runs = opts["runs"] if (transport, size) in common.HEADLINE else opts["other_runs"]
                per_impl: dict[str, list[dict[str, float]]] = {impl: [] for impl in common.IMPLS}
                for run, impl in common.alternate(runs):
                    for attempt in range(1, RUN_ATTEMPTS + 1):
                        case_id += 1
                        case = bench.plan_case(pattern, transport, size, quick)
                        case["id"] = f"{os.getpid() % 100000}-{case_id}"
                        try:
                            bind, connect = run_pair(
                                session,
                                impl,
                                transport,
                                bind_half,
                                connect_half,
                                case,
                                measured_by,
                                case["bound_s"] + 10,
                            )
                            figs = bench.figures(case, bind, connect)
                            break
                        except Exception as exc:  # e.g. a discovery update lost under load
                            common.note(
                                f"{bench.name} {pattern} {transport} {size} {impl}: "
                                f"attempt {attempt} failed: {exc}"
                            )
                            if attempt == RUN_ATTEMPTS:
                                raise
                    per_impl[impl].append(figs)
                    common.note(
                        f"{bench.name} {pattern} {transport} {common.size_label(size)} "
                        f"{impl} run {run + 1}/{runs}: "
                        + ", ".join(
                            f"{k} {v:,.1f}"
                            for k, v in figs.items()
                            if isinstance(v, (int, float)) and k != "samples"
                        ),
                        opts["json"] and not opts["verbose"],
                    )
                for impl in common.IMPLS:
                    merged = common.merge_runs(per_impl[impl])
                    row = common.Row(bench.name, pattern, transport, size, impl)
                    for key, value in merged.items():
                        if key in common.FIELDS:
                            setattr(row, key, value)
                        else:
                            row.extra[key] = value
                    rows.append(row)
    common.add_ratios(rows)
    return rows


def make_cli(script: str, bench: Bench) -> Any:
    import click
    import common

    def bench_options(fn: Any) -> Any:
        options = [
            click.option("--quick", is_flag=True, help="Reduced matrix (64 B and 1 MiB), < 60 s."),
            click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout."),
            click.option(
                "--plot", "plot_file", metavar="FILE.png", help="Write a plot (matplotlib)."
            ),
            click.option(
                "--runs",
                default=3,
                show_default=True,
                help="Runs of each headline case (tcp, 64 B and 1 MiB); medians are reported.",
            ),
            click.option("--other-runs", default=1, show_default=True, help="Runs of other cases."),
            click.option("--sizes", help="Comma list, e.g. 64,4k,1m (default 64 B .. 1 MiB)."),
            click.option("--transports", help="Comma list of tcp,ipc,inproc (default all)."),
            click.option(
                "--patterns", help=f"Comma list of {','.join(bench.patterns)} (default all)."
            ),
            click.option("--verbose", is_flag=True, help="Per-run progress even with --json."),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    def run(server: str, spawn: bool, opts: dict[str, Any]) -> None:
        opts = dict(opts, json=opts.pop("as_json"))
        started = time.monotonic()
        common.note(f"{bench.name}: {common.machine_note()}", opts["json"] and not opts["verbose"])
        session = Session(script, server, bench.halves, spawn, WORKER_MAX_S)
        ok = False
        try:
            rows = drive(session, bench, opts)
            ok = True
        finally:
            session.close()
            if session.stuck and not ok:
                sys.stderr.flush()
                os._exit(1)  # a stuck thread would keep this process alive
        if opts["json"]:
            common.emit_json(rows)
        else:
            common.print_table(rows)
            common.print_targets(bench.targets(rows))
            print(
                f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s; {common.machine_note()}"
            )
        if opts["plot_file"]:
            common.plot(rows, opts["plot_file"])
            common.note(f"plot written to {opts['plot_file']}", opts["json"])
        if session.stuck:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    @click.group(invoke_without_command=True, help=sys.modules["__main__"].__doc__)
    @bench_options
    @click.pass_context
    def cli(ctx: click.Context, **opts: Any) -> None:
        if ctx.invoked_subcommand is None:
            run(f"perf-{os.getpid() % 100000}-{os.urandom(2).hex()}", True, opts)

    @cli.command(help="Serve the remote halves of every case (two-host mode).")
    @click.option("--name", required=True, help="Node name the probe looks for.")
    @click.option("--max-seconds", default=1800, show_default=True, help="Stop after this long.")
    def serve(name: str, max_seconds: int) -> None:
        serve_main(script, name, bench.halves, max_seconds)

    @cli.command(help="Measure against a running `serve --name SERVER`, found by discovery.")
    @click.argument("server")
    @bench_options
    def probe(server: str, **opts: Any) -> None:
        run(server, False, opts)

    @cli.command(hidden=True)
    @click.option("--address", default="127.0.0.1")
    def worker(address: str) -> None:
        worker_main(bench.halves, address)

    return cli
