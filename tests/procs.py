"""Real child processes for multi-process tests: start a Python snippet, wait for its READY line,
read its output lines with timeouts, stop it (SIGTERM, then SIGKILL) and always reap it."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READY = "READY"


class Child:
    """One child process; its stdout lines arrive on a queue read by a reader thread."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=str(ROOT),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_out, name="test-child-stdout"),
            threading.Thread(target=self._read_err, name="test-child-stderr"),
        ]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def readline(self, timeout: float = 10.0) -> str:
        """The next stdout line. Raises TimeoutError or EOFError (with the child's stderr)."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            tail = self.err_tail()
            raise TimeoutError(f"no output within {timeout} s; stderr:\n{tail}") from None
        if line is None:
            self.lines.put(None)
            raise EOFError(f"child exited ({self.proc.poll()}); stderr:\n{self.err_tail()}")
        return line

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        """Skip lines until one starts with ``prefix``; return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def json_line(self, timeout: float = 10.0) -> Any:
        return json.loads(self.readline(timeout))

    def err_tail(self, n: int = 30) -> str:
        return "\n".join(self.stderr[-n:])

    def out_rest(self) -> str:
        """The stdout lines not read yet (what a failed assertion should show)."""
        rest = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                rest.append(line)
        return "\n".join(rest[-40:])

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait, then SIGKILL; always reaps. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return self.proc.returncode


class ProcessGroup:
    def __init__(self) -> None:
        self.children: list[Child] = []

    def python(self, code: str, *, ready: bool = True, timeout: float = 15.0,
               env: dict[str, str] | None = None) -> Child:
        """Run ``code`` (dedented) in a new interpreter; wait for it to print READY."""
        child = Child([sys.executable, "-c", textwrap.dedent(code)], env)
        self.children.append(child)
        if ready:
            child.expect(READY, timeout)
        return child

    def cli(self, *args: str, env: dict[str, str] | None = None) -> Child:
        """Run ``python -m zmqfabric ARGS``."""
        child = Child([sys.executable, "-m", "zmqfabric", *args], env)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            child.stop()
