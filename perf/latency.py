"""Latency of zmqfabric and of raw pyzmq doing the same work, in the same run, alternating.

- reqrep: round trip of one request (a bytes body of SIZE) to an echo service and back, timed
  by the caller with perf_counter. Fabric: ``requester.request(body)`` against a node's
  ``@node.reply`` echo, served by ``node.run()``. Raw: REQ -> REP, ``send(packb(body))`` /
  ``unpackb(recv())`` on both sides, one frame.
- pubsub: one-way latency, timestamps in the message (time.time() on one host). Fabric: the
  header's timestamp (``Message.timestamp``, set inside ``publisher.send``) against the clock
  after ``subscription.recv_message()``. Raw: one frame ``topic + 8-byte timestamp +
  packb(body)`` as protocol 2 sends one frame (bodies of 64 KiB and more: ``[topic +
  timestamp, body]``, two frames, as the fabric's raw bodies). Each
  message waits for the subscriber's acknowledgement (a raw PUSH, same for both) before the next
  goes, so no message queues behind another.

Bodies of 64 KiB and more travel as raw bytes in both (the fabric's zero-copy rule). Percentiles
come from the sorted samples of each run; headline cases (tcp 64 B and 1 MiB) are run --runs
times (median reported). Raw halves run in processes without any fabric node.

    python3 perf/latency.py [--quick] [--json] [--plot FILE.png]     # server spawned on this host
    python3 perf/latency.py serve --name X                           # two hosts: on one ...
    python3 perf/latency.py probe X [--quick] [--json]               # ... and on the other

Over two hosts pub/sub one-way latency is only as good as the hosts' clock sync. All traffic of
the default run is on loopback (tcp 127.0.0.1, ipc in /tmp, inproc).
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from typing import Any

import common
import msgpack
import zmq
from bench_env import (
    SETUP_TIMEOUT_S,
    Env,
    fabric_connect,
    fabric_expose,
    payload,
    raw_is_binary,
)
from bench_server import echo_info
from harness import make_cli

#: A reply or acknowledgement later than this (s) means the peer is gone: the run stops.
REPLY_TIMEOUT_S = 5.0
_TS = struct.Struct(">d")


# --- request/reply -------------------------------------------------------------------------------


def rr_server(env: Env, case: dict[str, Any], announce: Any, stop: threading.Event) -> dict:
    if env.impl == "fabric":
        # The node's own echo service (served by node.run / serve_in_background) answers.
        announce(echo_info(env, case["transport"]))
        stop.wait(case["bound_s"])
        return {}
    sock = env.socket(zmq.REP)
    try:
        url = env.bind(sock, case["transport"], f"rr-{case['id']}")
        sock.setsockopt(zmq.RCVTIMEO, 100)
        announce({"url": url})
        end = time.monotonic() + case["bound_s"]
        recv, send = sock.recv, sock.send
        packb, unpackb = msgpack.packb, msgpack.unpackb
        binary = raw_is_binary(case["size"])
        while not stop.is_set() and time.monotonic() < end:
            try:
                msg = recv()
            except zmq.Again:
                continue
            if binary:
                send(msg, copy=False)
            else:
                send(packb(unpackb(msg)))
        return {}
    finally:
        sock.close()


def rr_client(env: Env, case: dict[str, Any], announce: Any, stop: threading.Event) -> dict:
    transport, peer = case["transport"], case["peer"]
    body = payload(case["size"])
    n, warmup = case["n"], case["warmup"]
    pc, mono = time.perf_counter, time.monotonic
    samples: list[float] = []
    append = samples.append
    if env.impl == "fabric":
        req, bypassed = fabric_connect(env, env.node.requester, "rep", peer, transport)
        try:
            announce({})
            request = req.request
            for _ in range(warmup):
                request(body, REPLY_TIMEOUT_S)
            end = mono() + case["seconds"]
            for i in range(n):
                t0 = pc()
                request(body, REPLY_TIMEOUT_S)
                append(pc() - t0)
                if not i & 63 and (mono() > end or stop.is_set()):
                    break
        finally:
            req.close()
        return {"samples": samples, "discovery_bypassed": bypassed}
    sock = env.socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
        sock.connect(peer["url"])
        announce({})
        send, recv = sock.send, sock.recv
        packb, unpackb = msgpack.packb, msgpack.unpackb
        if raw_is_binary(case["size"]):
            for _ in range(warmup):
                send(body, copy=False)
                recv()
            end = mono() + case["seconds"]
            for i in range(n):
                t0 = pc()
                send(body, copy=False)
                recv()
                append(pc() - t0)
                if not i & 63 and (mono() > end or stop.is_set()):
                    break
        else:
            for _ in range(warmup):
                send(packb(body))
                unpackb(recv())
            end = mono() + case["seconds"]
            for i in range(n):
                t0 = pc()
                send(packb(body))
                unpackb(recv())
                append(pc() - t0)
                if not i & 63 and (mono() > end or stop.is_set()):
                    break
    finally:
        sock.close()
    return {"samples": samples}


# --- publish/subscribe ---------------------------------------------------------------------------


def ps_pub(env: Env, case: dict[str, Any], announce: Any, stop: threading.Event) -> dict:
    """Publish one message, wait for its acknowledgement, repeat; warm-ups ("w") until the
    subscriber is joined, then n measured messages ("m"), then end ("e")."""
    transport, tag = case["transport"], f"psl-{case['id']}"
    body = payload(case["size"])
    ack = env.socket(zmq.PULL)
    ack.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
    pub: Any = None
    try:
        ack_url = env.bind(ack, transport, tag + "-ack")
        if env.impl == "fabric":
            pub = env.node.publisher(f"{env.node.name[:40]}-{tag}")
            info = fabric_expose(env, pub, transport, tag)
            send = pub.send

            def emit(topic: str) -> None:
                send(topic, body)
        else:
            pub = env.socket(zmq.PUB)
            info = {"url": env.bind(pub, transport, tag)}
            send_one, send_multipart = pub.send, pub.send_multipart
            packb, now = msgpack.packb, time.time
            binary = raw_is_binary(case["size"])
            pack_ts = _TS.pack

            def emit(topic: str) -> None:
                head = topic.encode() + pack_ts(now())
                if binary:
                    send_multipart([head, body], copy=False)
                else:
                    send_one(head + packb(body))

        announce(dict(info, ack=ack_url))
        if not _join(emit, ack, stop):
            return {"sent": 0, "joined": False}
        end = time.monotonic() + case["seconds"]
        sent = 0
        recv = ack.recv
        for i in range(case["n"] + case["warmup"]):
            emit("m")
            sent += 1
            while recv() != b"m":  # skip late warm-up acknowledgements
                pass
            if not i & 63 and (time.monotonic() > end or stop.is_set()):
                break
        for _ in range(3):
            emit("e")
        # Keep the publisher until the subscriber is done: closing it makes discovery tell the
        # subscriber to disconnect, and libzmq aborts (fq.cpp "!_more") when a SUB reads a
        # multipart message queued from a peer it has just disconnected (libzmq #2163).
        stop.wait(case["bound_s"])
        return {"sent": sent, "joined": True}
    finally:
        if pub is not None:
            pub.close()
        ack.close()


def _join(emit: Any, ack: zmq.Socket, stop: threading.Event) -> bool:
    """Send warm-ups until the subscriber acknowledges one (ZeroMQ's slow joiner)."""
    end = time.monotonic() + SETUP_TIMEOUT_S
    while time.monotonic() < end and not stop.is_set():
        emit("w")
        if ack.poll(5):
            ack.recv()
            return True
    return False


def ps_sub(env: Env, case: dict[str, Any], announce: Any, stop: threading.Event) -> dict:
    transport, peer = case["transport"], case["peer"]
    ack = env.socket(zmq.PUSH)
    ack.setsockopt(zmq.SNDTIMEO, int(REPLY_TIMEOUT_S * 1000))
    ack.connect(peer["ack"])
    ack_send = ack.send
    samples: list[float] = []
    append = samples.append
    now = time.time
    try:
        if env.impl == "fabric":
            sub, bypassed = fabric_connect(env, env.node.subscribe, "pub", peer, transport)
            try:
                announce({})
                recv = sub.recv_message
                while (msg := recv(REPLY_TIMEOUT_S)) is not None:
                    t = now()
                    topic = msg.topic
                    if topic == "m":
                        append(t - msg.timestamp)
                        ack_send(b"m")
                    elif topic == "w":
                        ack_send(b"w")
                    else:
                        break
            finally:
                sub.close()
        else:
            sub = env.socket(zmq.SUB)
            try:
                sub.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.connect(peer["url"])
                announce({})
                recv, recv_multipart = sub.recv, sub.recv_multipart
                unpackb, unpack_ts = msgpack.unpackb, _TS.unpack_from
                binary = raw_is_binary(case["size"])
                while True:
                    try:
                        if binary:
                            head, data = recv_multipart()
                        else:
                            head = recv()
                            unpackb(head[9:])
                    except zmq.Again:
                        break
                    t = now()
                    topic = head[:1]
                    if topic == b"m":
                        append(t - unpack_ts(head, 1)[0])
                        ack_send(b"m")
                    elif topic == b"w":
                        ack_send(b"w")
                    else:
                        break
            finally:
                sub.close()
    finally:
        ack.close()
    return {"samples": samples[case["warmup"] :]}


# --- the bench -----------------------------------------------------------------------------------


class Latency:
    name = "latency"
    patterns = ("reqrep", "pubsub")
    halves = {"rr_server": rr_server, "rr_client": rr_client, "ps_pub": ps_pub, "ps_sub": ps_sub}

    def pair(self, pattern: str) -> tuple[str, str, str]:
        """(bind half, connect half, the half that measures)."""
        return (
            ("rr_server", "rr_client", "connect")
            if pattern == "reqrep"
            else ("ps_pub", "ps_sub", "connect")
        )

    def plan_case(self, pattern: str, transport: str, size: int, quick: bool) -> dict[str, Any]:
        big = size >= 256 * 1024
        n = 2_000 if quick else 20_000
        seconds = (0.4 if big else 0.6) if quick else (1.5 if big else 2.5)
        return {
            "pattern": pattern,
            "size": size,
            "n": n,
            "seconds": seconds,
            "warmup": 50 if big else 300,
            "bound_s": seconds + 25,
        }

    def figures(self, case: dict[str, Any], bind: dict, connect: dict) -> dict[str, float]:
        samples = connect["samples"]
        if not samples:
            raise RuntimeError(f"no samples for {case}")
        return common.latency_figures(samples)

    def targets(self, rows: list[common.Row]) -> list[tuple[str, float | None, str, bool | None]]:
        out: list[tuple[str, float | None, str, bool | None]] = []
        for r in rows:
            if (r.impl, r.transport, r.size) != ("fabric", "tcp", 64) or r.ratio is None:
                continue
            if r.pattern == "reqrep":
                out.append(
                    (
                        "reqrep tcp 64 B round trip p50 fabric/raw",
                        r.ratio,
                        "<= 1.10",
                        r.ratio <= 1.10,
                    )
                )
                p99 = r.extra.get("ratio_p99")
                out.append(
                    (
                        "reqrep tcp 64 B round trip p99 fabric/raw",
                        p99,
                        "<= 1.25",
                        None if p99 is None else p99 <= 1.25,
                    )
                )
            else:
                out.append(("pubsub tcp 64 B one-way p50 fabric/raw", r.ratio, "(none)", None))
        return out


if __name__ == "__main__":
    sys.exit(make_cli(__file__, Latency())())
