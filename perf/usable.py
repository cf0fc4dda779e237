"""How long a new node takes to be usable by others: from the moment its ``start()`` is called,
and from the moment it returns (it claims its name first: CONFLICT_WINDOW_S), to the first reply
a peer (already running) gets from its service. The peer learns of the newcomer
by mDNS or its hello, verifies the record with the newcomer's control endpoint (the cost measured
here) and connects.

    python3 perf/usable.py [--runs N] [--keys]       # both nodes on this host (loopback)

Both processes print ``time.monotonic()`` (one clock for every process on a host, and for every
network namespace too: tests/attacks runs the same two programs across namespaces). Prints the
median and the spread of N runs as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

NEWCOMER = """
import sys, time, zmqfabric as zf
node = zf.Node(sys.argv[1], fabric=sys.argv[2], keys=sys.argv[3] or None)
@node.reply(sys.argv[1])
def echo(body):
    return body
begun = time.monotonic()
node.start()
print("STARTED", begun, time.monotonic(), flush=True)
node.run(timeout=30)
node.close()
"""

PEER = """
import sys, time, zmqfabric as zf
with zf.Node("peer-" + sys.argv[2], fabric=sys.argv[2], keys=sys.argv[3] or None) as node:
    print("READY", flush=True)
    names = sys.stdin.readline().split()
    for name in names:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                node.request(name, "x", timeout=0.05)
                break
            except zf.FabricError:
                pass
        print("ANSWERED", name, time.monotonic(), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keys", action="store_true", help="secure both nodes (CURVE)")
    args = parser.parse_args()
    fabric = "u" + uuid.uuid4().hex[:8]
    keys = ""
    if args.keys:
        from zmqfabric.security import keys as keyfiles

        keys = tempfile.mkdtemp(prefix="zf-usable-")
        keyfiles.generate(keys)
    names = [f"new{i}" for i in range(args.runs)]
    peer = subprocess.Popen([sys.executable, "-c", PEER, "", fabric, keys], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert peer.stdout is not None and peer.stdin is not None
    assert peer.stdout.readline().startswith("READY")
    peer.stdin.write(" ".join(names) + "\n")
    peer.stdin.flush()
    delays: list[float] = []
    from_begin: list[float] = []
    for name in names:
        child = subprocess.Popen([sys.executable, "-c", NEWCOMER, name, fabric, keys],
                                 text=True, stdout=subprocess.PIPE)
        assert child.stdout is not None
        _, begun, started = child.stdout.readline().split()
        answered = float(peer.stdout.readline().split()[2])
        delays.append(answered - float(started))
        from_begin.append(answered - float(begun))
        child.terminate()
        child.wait(10)
        time.sleep(0.2)
    peer.wait(30)
    print(json.dumps({"runs": args.runs, "keys": args.keys,
                      "after_start_returned_ms": _spread(delays),
                      "after_start_called_ms": _spread(from_begin)}))


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values) * 1000, 1),
            "min": round(min(values) * 1000, 1), "max": round(max(values) * 1000, 1)}


if __name__ == "__main__":
    main()
