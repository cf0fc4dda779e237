"""Throughput of zmqfabric and of raw pyzmq doing the same work, in the same run, alternating.
Sender and receiver are separate processes (inproc: two threads of one process).

- pushpull: the sender pushes bytes bodies of SIZE as fast as it can (ZeroMQ's HWM pushes back);
  the receiver times them from the first to the last. Fabric: ``pusher.send(body)`` ->
  ``puller.recv()``. Raw: PUSH ``send(packb(body))`` -> PULL ``unpackb(recv())``, one frame.
- pubsub: the same over a stream, once the subscriber has joined (warm-ups until it answers on
  a raw acknowledgement socket). Fabric: ``publisher.send("m", body)`` ->
  ``subscription.recv()``. Raw: PUB ``send(b"m" + packb(body))`` -> SUB ``unpackb(recv()[1:])``,
  one frame as protocol 2 sends one (bodies of 64 KiB and more: ``[b"m", body]``, two frames
  and no msgpack, as the fabric's raw bodies). The raw publisher is an XPUB with XPUB_NODROP (a
  send waits at the HWM: lossless, the best a raw program delivers); the fabric's publisher
  never waits and drops at the HWM when it outruns its subscriber (ZeroMQ pub/sub): the rate is
  what the subscriber received, and drops are reported.

Rates are messages per second and MB/s (10^6 bytes of body) at the receiver. Bodies of 64 KiB
and more travel as raw bytes in both (the fabric's zero-copy rule); smaller ones are msgpack
packed and unpacked by both. Both sides use the fabric's HWM. Runs per case are capped in count,
bytes and time; headline cases (tcp 64 B and 1 MiB) are run --runs times (median reported). Raw
halves run in processes without any fabric node.

    python3 perf/throughput.py [--quick] [--json] [--plot FILE.png]  # server spawned on this host
    python3 perf/throughput.py serve --name X                        # two hosts: on one ...
    python3 perf/throughput.py probe X [--quick] [--json]            # ... and on the other

All traffic of the default run is on loopback (tcp 127.0.0.1, ipc in /tmp, inproc).
"""

from __future__ import annotations

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
from harness import make_cli

from zmqfabric.errors import FabricTimeoutError

#: The receiver stops this long (s) after the last message when fewer than expected arrive.
IDLE_S = 0.5
#: A send blocked (HWM) for longer than this (s) means the receiver is gone.
SEND_TIMEOUT_S = 10.0
#: Receivers note (count, time) every MARK+1 messages, for runs that end by the idle timeout.
MARK = 1023


def _result(count: int, t0: float, t_end: float) -> dict[str, Any]:
    return {"count": count, "elapsed": max(t_end - t0, 1e-9)}


# --- push/pull -----------------------------------------------------------------------------------


def pp_pull(env: Env, case: dict[str, Any], announce: Any, stop: threading.Event) -> dict:
    transport, tag, n = case["transport"], f"pp-{case['id']}", case["n"]
    pc = time.perf_counter
    if env.impl == "fabric":
        pull = env.node.puller(f"{env.node.name[:40]}-{tag}")
        try:
            announce(fabric_expose(env, pull, transport, tag))
            recv = pull.recv
            try:
                recv(SETUP_TIMEOUT_S)
            except FabricTimeoutError:
                return _result(0, 0.0, 0.0)
            t0 = t_mark = pc()
            count = c_mark = 1
            try:
                while count < n:
                    recv(IDLE_S)
                    count += 1
                    if not count & MARK:
                        t_mark, c_mark = pc(), count
                t_mark, c_mark = pc(), count
            except FabricTimeoutError:
                pass
            return _result(c_mark, t0, t_mark)
        finally:
            pull.close()
    sock = env.socket(zmq.PULL)
    try:
        announce({"url": env.bind(sock, transport, tag)})
        sock.setsockopt(zmq.RCVTIMEO, int(SETUP_TIMEOUT_S * 1000))
        recv, unpackb = sock.recv, msgpack.unpackb
        binary = raw_is_binary(case["size"])
        try:
            data = recv()
        except zmq.Again:
            return _result(0, 0.0, 0.0)
        if not binary:
            unpackb(data)
        sock.setsockopt(zmq.RCVTIMEO, int(IDLE_S * 1000))
        t0 = t_mark = pc()
        count = c_mark = 1
        try:
            if binary:
                while count < n:
                    recv()
                    count += 1
                    if not count & MARK:
                        t_mark, c_mark = pc(), count
            else:
                while count < n:
                    unpackb(recv())
                    count += 1
                    if not count & MARK:
                        t_mark, c_mark = pc(), count
            t_mark, c_mark = pc(), count
        except zmq.Again:
            pass
        return _result(c_mark, t0, t_mark)
    finally:
        sock.close()


def pp_push(env: Env, case: dict[str, Any], announce: Any, stop: threading.Event) -> dict:
    transport, peer, n = case["transport"], case["peer"], case["n"]
    body = payload(case["size"])
    pc, mono = time.perf_counter, time.monotonic
    sent = 0
    if env.impl == "fabric":
        push, _ = fabric_connect(env, env.node.pusher, "pull", peer, transport)
        try:
            announce({})
            send = push.send
            send(body, SETUP_TIMEOUT_S)  # waits for discovery and the connection
            sent = 1
            end = mono() + case["seconds"]
            t0 = pc()
            for sent in range(2, n + 1):
                send(body, SEND_TIMEOUT_S)
                if not sent & MARK and (mono() > end or stop.is_set()):
                    break
            elapsed = pc() - t0
            stop.wait(case["bound_s"])  # until the receiver is done: close drops what is queued
            return {"sent": sent, "elapsed": elapsed}
        finally:
            push.close()
    sock = env.socket(zmq.PUSH)
    try:
        sock.setsockopt(zmq.SNDTIMEO, int(SEND_TIMEOUT_S * 1000))
        sock.connect(peer["url"])
        announce({})
        send, packb = sock.send, msgpack.packb
        end = mono() + case["seconds"]
        t0 = pc()
        if raw_is_binary(case["size"]):
            for sent in range(1, n + 1):
                send(body, copy=False)
                if not sent & MARK and (mono() > end or stop.is_set()):
                    break
        else:
            for sent in range(1, n + 1):
                send(packb(body))
                if not sent & MARK and (mono() > end or stop.is_set()):
                    break
        elapsed = pc() - t0
        stop.wait(case["bound_s"])  # until the receiver is done: close drops what is queued
        return {"sent": sent, "elapsed": elapsed}
    finally:
        sock.close()


# --- publish/subscribe ---------------------------------------------------------------------------


def pst_pub(env: Env, case: dict[str, Any], announce: Any, stop: threading.Event) -> dict:
    """Warm-ups ("w") until the subscriber acknowledges one, then n events ("m") as fast as the
    publisher goes, then a few ends ("e"; the subscriber also stops when idle)."""
    transport, tag, n = case["transport"], f"pst-{case['id']}", case["n"]
    body = payload(case["size"])
    binary = raw_is_binary(case["size"])
    pc, mono = time.perf_counter, time.monotonic
    ack = env.socket(zmq.PULL)
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
            pub = env.socket(zmq.XPUB)  # sends as a PUB; subscriptions stay unread
            # Lossless: a send waits at the HWM. A raw PUB that outruns its subscriber drops
            # there and spends the CPU its I/O thread needs on messages nobody gets: its
            # subscriber then received 0.37x of the lossless rate (perf/wirebench.py ``ps``).
            pub.setsockopt(zmq.XPUB_NODROP, 1)
            info = {"url": env.bind(pub, transport, tag)}
            send_one, send_multipart, packb = pub.send, pub.send_multipart, msgpack.packb

            def emit(topic: str) -> None:
                if binary:
                    send_multipart([topic.encode(), body], copy=False)
                else:
                    send_one(topic.encode() + packb(body))

        announce(dict(info, ack=ack_url))
        end = mono() + SETUP_TIMEOUT_S
        while not ack.poll(5):
            if mono() > end or stop.is_set():
                return {"sent": 0, "elapsed": 0.0}
            emit("w")
        ack.recv()
        end = mono() + case["seconds"]
        t0 = pc()
        sent = 0
        if env.impl == "fabric":
            for sent in range(1, n + 1):
                send("m", body)
                if not sent & MARK and (mono() > end or stop.is_set()):
                    break
        elif binary:
            for sent in range(1, n + 1):
                send_multipart([b"m", body], copy=False)
                if not sent & MARK and (mono() > end or stop.is_set()):
                    break
        else:
            for sent in range(1, n + 1):
                send_one(b"m" + packb(body))
                if not sent & MARK and (mono() > end or stop.is_set()):
                    break
        elapsed = pc() - t0
        for _ in range(3):
            emit("e")
        stop.wait(case["bound_s"])  # until the subscriber is done: close drops what is queued
        return {"sent": sent, "elapsed": elapsed}
    finally:
        if pub is not None:
            pub.close()
        ack.close()


def pst_sub(env: Env, case: dict[str, Any], announce: Any, stop: threading.Event) -> dict:
    transport, peer, n = case["transport"], case["peer"], case["n"]
    pc = time.perf_counter
    ack = env.socket(zmq.PUSH)
    ack.connect(peer["ack"])
    count = c_mark = 0
    t0 = t_mark = 0.0
    try:
        if env.impl == "fabric":
            sub, _ = fabric_connect(env, env.node.subscribe, "pub", peer, transport)
            try:
                announce({})
                recv = sub.recv
                try:
                    topic, _ = recv(SETUP_TIMEOUT_S)
                    while topic == "w":
                        ack.send(b"w", zmq.NOBLOCK)
                        topic, _ = recv(SETUP_TIMEOUT_S)
                    if topic == "m":
                        t0 = t_mark = pc()
                        count = c_mark = 1
                        while count < n:
                            topic, _ = recv(IDLE_S)
                            if topic != "m":
                                break
                            count += 1
                            if not count & MARK:
                                t_mark, c_mark = pc(), count
                        t_mark, c_mark = pc(), count
                except FabricTimeoutError:
                    pass
            finally:
                sub.close()
        else:
            sub = env.socket(zmq.SUB)
            try:
                sub.setsockopt(zmq.SUBSCRIBE, b"")
                sub.setsockopt(zmq.RCVTIMEO, int(SETUP_TIMEOUT_S * 1000))
                sub.connect(peer["url"])
                announce({})
                recv, recv_multipart = sub.recv, sub.recv_multipart
                unpackb = msgpack.unpackb
                binary = raw_is_binary(case["size"])

                def first() -> tuple[bytes, bytes]:
                    if binary:
                        topic, data = recv_multipart()
                        return topic, data
                    data = recv()
                    return data[:1], data[1:]

                try:
                    topic, data = first()
                    while topic == b"w":
                        ack.send(b"w", zmq.NOBLOCK)
                        topic, data = first()
                    sub.setsockopt(zmq.RCVTIMEO, int(IDLE_S * 1000))
                    if topic == b"m":
                        if not binary:
                            unpackb(data)
                        t0 = t_mark = pc()
                        count = c_mark = 1
                        if binary:
                            while count < n:
                                topic, data = recv_multipart()
                                if topic != b"m":
                                    break
                                count += 1
                                if not count & MARK:
                                    t_mark, c_mark = pc(), count
                        else:
                            while count < n:
                                data = recv()
                                if data[:1] != b"m":
                                    break
                                unpackb(data[1:])
                                count += 1
                                if not count & MARK:
                                    t_mark, c_mark = pc(), count
                        t_mark, c_mark = pc(), count
                except zmq.Again:
                    pass
            finally:
                sub.close()
    finally:
        ack.close()
    return _result(c_mark, t0, t_mark)


# --- the bench -----------------------------------------------------------------------------------


class Throughput:
    name = "throughput"
    patterns = ("pushpull", "pubsub")
    halves = {"pp_pull": pp_pull, "pp_push": pp_push, "pst_pub": pst_pub, "pst_sub": pst_sub}

    def pair(self, pattern: str) -> tuple[str, str, str]:
        """(bind half, connect half, the half that measures: the receiver)."""
        return (
            ("pp_pull", "pp_push", "bind")
            if pattern == "pushpull"
            else ("pst_pub", "pst_sub", "connect")
        )

    def skip(self, pattern: str, transport: str, size: int) -> str | None:
        if transport == "inproc" and raw_is_binary(size):
            # Thousands of zero-copy frames in flight between two threads of one process hung
            # pyzmq 27 (sender in send, receiver in recv past its timeout; raw pyzmq too).
            return "zero-copy bodies over inproc hung pyzmq in this test"
        return None

    def plan_case(self, pattern: str, transport: str, size: int, quick: bool) -> dict[str, Any]:
        most, budget = (60_000, 512 << 20) if quick else (300_000, 2048 << 20)
        n = max(64, min(most, budget // size))
        seconds = 1.0 if quick else 4.0
        return {
            "pattern": pattern,
            "size": size,
            "n": n,
            "seconds": seconds,
            "bound_s": seconds + SETUP_TIMEOUT_S + 20,
        }

    def figures(self, case: dict[str, Any], bind: dict, connect: dict) -> dict[str, float]:
        receiver, sender = (bind, connect) if case["pattern"] == "pushpull" else (connect, bind)
        count = receiver["count"]
        if count < 2:
            raise RuntimeError(f"receiver got {count} messages in {case}")
        rate = (count - 1) / receiver["elapsed"]
        return {
            "samples": count,
            "msgs_per_s": rate,
            "mb_per_s": rate * case["size"] / 1e6,
            "sent": sender["sent"],
            "dropped": max(0, sender["sent"] - count),
            "drop_pct": 100.0 * max(0, sender["sent"] - count) / max(1, sender["sent"]),
            "sender_msgs_per_s": sender["sent"] / sender["elapsed"] if sender["elapsed"] else 0,
        }

    def targets(self, rows: list[common.Row]) -> list[tuple[str, float | None, str, bool | None]]:
        out: list[tuple[str, float | None, str, bool | None]] = []
        for r in rows:
            if (r.impl, r.transport) != ("fabric", "tcp") or r.ratio is None:
                continue
            if r.size == 64:
                out.append(
                    (f"{r.pattern} tcp 64 B msgs/s fabric/raw", r.ratio, ">= 0.90", r.ratio >= 0.90)
                )
            elif r.size == 1024 * 1024:
                out.append(
                    (f"{r.pattern} tcp 1 MiB MB/s fabric/raw", r.ratio, ">= 0.95", r.ratio >= 0.95)
                )
        return out


if __name__ == "__main__":
    sys.exit(make_cli(__file__, Throughput())())
