"""Running perf halves (``perf/harness.py`` explains halves): in threads of this process
(:class:`Runner`), or in a raw worker child process (:class:`ChildWorker`, ``SCRIPT worker``)
that imports no fabric node, driven by JSON lines on its stdin/stdout. Both are a
:class:`Worker`; :func:`dispatch` maps one command of that protocol to a worker call. Every wait
is bounded; children are stopped with quit, then SIGTERM, then SIGKILL (:func:`stop_process`).
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import Any, Mapping, Protocol

from bench_env import QUIT_GRACE_S, ROOT, SETUP_TIMEOUT_S, WORKER_MAX_S, Env, Half


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

    def __init__(self, env: Env, halves: Mapping[str, Half]) -> None:
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


def checked(reply: dict[str, Any]) -> dict[str, Any]:
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
        checked(self._call({"op": "hello"}, SETUP_TIMEOUT_S))

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
        reply = checked(
            self._call({"op": "start", "half": half, "case": case}, SETUP_TIMEOUT_S + 5)
        )
        return reply["job"], reply["info"]

    def finish(self, job: int, stop: bool, timeout: float) -> dict[str, Any]:
        cmd = {"op": "finish", "job": job, "stop": stop, "timeout": timeout}
        return checked(self._call(cmd, timeout + QUIT_GRACE_S + 5))["result"]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self._call({"op": "quit"}, QUIT_GRACE_S)
        except (RuntimeError, OSError, ValueError):
            pass
        stop_process(self.proc)
        self._reader.join(QUIT_GRACE_S)


def worker_main(halves: Mapping[str, Half], address: str) -> None:
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
