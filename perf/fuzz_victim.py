"""The node under fire, for ``perf/fuzz_network.py``: a child process (``VICTIM``) with a reply
service, a task worker, two pipeline pullers and two stream subscriptions (one of each reads
with ``recv_message``, the other with the ``recv`` hot path), its control endpoint, and a task
producer. A subscriber only hears publishers it connects to, and a producer only gives tasks to
workers it knows, so the script's raw PUBs and its raw worker (a ROUTER) enter the child's
directory as discovery would put them there. Each reader counts what it receives
(``fuzz_good_<name>``), so the script can read the counts with ``stats``.
"""

from __future__ import annotations

import json
import os

from tests.procs import Child, ProcessGroup

#: Seconds the child gets to start.
START_S = 30.0

VICTIM = r"""
import json, os, secrets, threading
import zmqfabric as zf
from zmqfabric.core.records import Endpoint, EndpointKind, NodeRecord
from zmqfabric.errors import FabricTimeoutError

node = zf.Node(NAME)
stop = threading.Event()
started = [threading.Event() for _ in range(4)]

@node.reply(SVC)
def echo(body):
    return {"echo": body}

@node.task(TASK)
def work(payload):
    node.counters.add("fuzz_good_tasks")

def pull(i, name, hot):
    with node.puller(name) as puller:
        started[i].set()
        while not stop.is_set():
            if hot:
                try:
                    puller.recv(timeout=0.1)
                except FabricTimeoutError:
                    continue
            elif puller.recv_message(timeout=0.1) is None:
                continue
            node.counters.add("fuzz_good_" + name)

def subscribe(i, name, hot):
    with node.subscribe(name) as sub:
        started[i].set()
        while not stop.is_set():
            if hot:
                try:
                    sub.recv(timeout=0.1)
                except FabricTimeoutError:
                    continue
            elif sub.recv_message(timeout=0.1) is None:
                continue
            node.counters.add("fuzz_good_" + name)

with node:
    # The hostile publishers enter the directory as discovery would put them there.
    for i, (stream, port) in enumerate(PUBS):
        node.directory.put(NodeRecord(f"{NAME[:36]}-pub{i}", secrets.token_hex(8), "raw-host",
                                      os.getpid(), "127.0.0.1",
                                      (Endpoint(EndpointKind.STREAM, stream, port),), 1))
    # So does the hostile worker, and this node gives it a task: its producer connects.
    node.directory.put(NodeRecord(f"{NAME[:36]}-worker", secrets.token_hex(8), "raw-host",
                                  os.getpid(), "127.0.0.1",
                                  (Endpoint(EndpointKind.TASK, PRODUCE, WORKER_PORT),), 1))
    node.submit(PRODUCE, "fz-real")
    workers = [threading.Thread(target=pull, args=(0, PIPES[0], False)),
               threading.Thread(target=pull, args=(1, PIPES[1], True)),
               threading.Thread(target=subscribe, args=(2, PUBS[0][0], False)),
               threading.Thread(target=subscribe, args=(3, PUBS[1][0], True))]
    for worker in workers:
        worker.start()
    try:
        assert all(event.wait(10) for event in started)
        ports = {f"{ep.kind.value}:{ep.name}": ep.port for ep in node.record.endpoints}
        print("READY", flush=True)
        print("INFO " + json.dumps({"name": node.name, "pid": os.getpid(), "ports": ports}),
              flush=True)
        node.run()
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
"""


class Victim:
    """The child node; its names carry ``tag`` so that runs never meet."""

    def __init__(self, procs: ProcessGroup, pub_ports: list[int], worker_port: int,
                 tag: str) -> None:
        self.svc, self.task, self.produce = f"fz-svc-{tag}", f"fz-task-{tag}", f"fz-prod-{tag}"
        self.pipes = [f"fz-jobs-{tag}", f"fz-jobs-hot-{tag}"]
        self.streams = [f"fz-ticks-{tag}", f"fz-ticks-hot-{tag}"]
        pubs = list(zip(self.streams, pub_ports, strict=True))
        head = (f"NAME = 'fz-victim-{tag}'\nSVC = {self.svc!r}\nTASK = {self.task!r}\n"
                f"PIPES = {self.pipes!r}\nPUBS = {pubs!r}\nPRODUCE = {self.produce!r}\n"
                f"WORKER_PORT = {worker_port}\n")
        self.child: Child = procs.python(head + VICTIM, timeout=START_S)
        info = json.loads(self.child.expect("INFO", START_S))
        self.name: str = info["name"]
        self.pid: int = info["pid"]
        self.ports: dict[str, int] = info["ports"]

    def port(self, kind: str, name: str) -> int:
        return self.ports[f"{kind}:{name}"]

    def resources(self) -> dict[str, int]:
        """Resident memory (KiB, now and peak) and open file descriptors, from /proc."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            fields = dict(line.split(":", 1) for line in status)
        out = {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}
        out["fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
        return out

    def alive(self) -> bool:
        return self.child.proc.poll() is None
