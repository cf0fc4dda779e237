"""The two processes of a perf run (``perf/harness.py`` explains halves): the server
(``SCRIPT serve --name X``: a fabric node with an echo service and an ``X-ctl`` reply service
that starts and finishes halves, its raw halves in a raw worker child) and the probe's
:class:`Session`, which finds the server by discovery (or spawns one on this host) and runs one
case of one implementation with :func:`run_pair`. Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import socket as pysocket
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import Any, Callable, Mapping

from bench_env import (
    CLOSE_TIMEOUT_S,
    FIND_TIMEOUT_S,
    QUIT_GRACE_S,
    ROOT,
    SETUP_TIMEOUT_S,
    Env,
    Half,
)
from bench_workers import ChildWorker, Runner, Worker, checked, dispatch, stop_process


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
    service = _echo_endpoint(node)  # the perf hook: bind in the owner, before serving
    for transport in ("ipc", "inproc"):
        service.socket.bind(env.url(transport, f"{name}-echo"))
    return node, env


def _echo_endpoint(node: Any) -> Any:
    """The node's echo service endpoint (the perf hook reaches into the node's services)."""
    wanted = echo_name(node.name)
    return next(ep for ep in node._services.endpoints() if ep.name == wanted)


def echo_info(env: Env, transport: str) -> dict[str, Any]:
    """Where this process's fabric echo service is reached over ``transport``."""
    name = env.node.name
    if transport == "tcp":
        port = _echo_endpoint(env.node).port
        return {"name": echo_name(name), "url": f"tcp://{env.address}:{port}"}
    return {"name": echo_name(name), "url": env.url(transport, f"{name}-echo")}


def serve_main(script: str, name: str, halves: Mapping[str, Half], max_seconds: float) -> None:
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
        return checked(
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
        self, script: str, server: str, halves: Mapping[str, Half], spawn: bool, max_seconds: float
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
            self.hello = checked(self.node.request(ctl_name(server), {"op": "hello"}, timeout=10))
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
