"""The environment of a perf half (``perf/harness.py`` explains halves): the process's raw
ZeroMQ context, its fabric node (fabric processes only), bind addresses for tcp, ipc and inproc,
and the perf hook that binds or connects a fabric handle over ipc/inproc (the fabric has no
public hook for those). Also the timeouts every part of the harness shares and the bodies the
benches send. Used by ``perf/latency.py`` and ``perf/throughput.py``.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any, Callable, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from zmqfabric.constants import HWM, ZERO_COPY_THRESHOLD  # noqa: E402
from zmqfabric.core import wire  # noqa: E402

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
        if transport != "tcp":
            return url
        return cast(bytes, sock.getsockopt(zmq.LAST_ENDPOINT)).decode()

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
    (the perf hook). A requester under that name still names the real service in its
    requests (protocol 2: a service refuses requests naming another). Either way messages go
    through the handle's own send/receive code."""
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
    if hasattr(handle, "_svc_tail"):  # a requester: its requests name the service they reach
        handle._svc_tail = wire.service_tail(info["name"])
    handle._apply("connect", info["url"])  # the owner thread: this one
    return handle, transport == "tcp"


def payload(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


def raw_is_binary(size: int) -> bool:
    """The raw programs mirror the fabric's rule: bytes bodies of at least the zero-copy threshold
    travel as they are (no msgpack, no copy); smaller ones are msgpack-packed and unpacked."""
    return size >= ZERO_COPY_THRESHOLD
