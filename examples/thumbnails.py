"""A service with workers: several processes serve "thumbnail", and callers reach any of them by
the service's name; each call goes to the next worker in turn.

    python3 examples/thumbnails.py              # 3 workers, 30 calls, then everything stops

Each worker is an ordinary node, run here with the `zmqfabric run` command, so one definition
serves under several names. By hand, from this folder:

    zmqfabric run thumbnails:worker --name thumbs-1        # in one terminal
    zmqfabric run thumbnails:worker --name thumbs-2        # in another
    zmqfabric req thumbnail '{"path": "a.png"}'            # answered by either
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys

import zmqfabric as zf

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(name: str = "thumbs") -> zf.Node:
    """A node serving "thumbnail" (`zmqfabric run thumbnails:worker --name NAME` serves it)."""
    node = zf.Node(name)

    @node.reply("thumbnail")
    def thumbnail(request: dict) -> dict:
        return {"path": request["path"], "size": 128, "by": node.name}

    return node


def main(workers: int = 3, calls: int = 30) -> None:
    names = [f"thumbs-{i}" for i in range(1, workers + 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "zmqfabric", "run", "thumbnails:worker",
                               "--name", name], cwd=HERE, stdout=subprocess.DEVNULL)
             for name in names]
    try:
        with zf.Node("thumbs-client", advertise=False) as client:
            for name in names:  # each worker is found by name within seconds of starting
                client.wait_for_node(name, timeout=30.0)
            served_by: collections.Counter[str] = collections.Counter()
            for i in range(calls):
                reply = client.request("thumbnail", {"path": f"{i}.png"}, timeout=5.0)
                served_by[reply["by"]] += 1
        print(f"{calls} thumbnails made by {workers} workers: "
              + ", ".join(f"{name} {served_by[name]}" for name in names))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)  # `zmqfabric run` stops cleanly and exits 0
        for proc in procs:
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
