"""Instructions per request/reply round trip, counted by callgrind in the working thread of one
side: load and the other processes on the machine do not change them, so they compare builds on
a busy machine where wirebench's latencies cannot.

One side (``client`` or ``service``; ``aio``: the asyncio one) runs wirebench's ``rr`` half under
``valgrind --tool=callgrind --separate-threads=yes``, the other runs plainly; this is done for
two request counts, and the figure is the largest difference of one thread's instructions (the
working thread: the service's driver, the client's main thread) over the difference of the
counts (setup and teardown cancel out). ``raw`` is wirebench's raw REQ
client or REP server.

    python3 perf/rrcost.py --builds old=/work/base20,new=. --side client --side service
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import click

HERE = os.path.dirname(os.path.abspath(__file__))
WIREBENCH = os.path.join(HERE, "wirebench.py")
#: Bounds one measured child (valgrind runs a Python process about 50 times slower).
CHILD_TIMEOUT_S = 600


def aio_client(url: str, name: str, n: int) -> None:
    """The asyncio client half (wirebench has none): ``aio.Node`` requests, 200 + ``n``."""
    import asyncio

    sys.path.insert(0, HERE)
    from wirebench import _connect, message

    import zmqfabric.aio as zfa

    async def run() -> None:
        async with zfa.Node(f"rrcost-{os.getpid()}") as node:
            request = _connect(node.requester(name), url).request
            for i in range(200 + n):
                await request(message(i), 5)

    asyncio.run(run())
    sys.stdin.readline()


def aio_service() -> None:
    """The asyncio service half: an ``aio.Node`` echo service, served until stdin says done."""
    import asyncio

    import zmqfabric.aio as zfa

    async def run() -> None:
        node = zfa.Node(f"rrcost-s-{os.getpid()}")
        name = f"rrcost-echo-{os.getpid()}"

        @node.reply(name)
        async def echo(body: object) -> object:
            return body

        async with node:
            serving = asyncio.create_task(node.run(handle_signals=False))
            port = next(ep.port for ep in node._services.endpoints() if ep.name == name)
            print(json.dumps({"url": f"tcp://127.0.0.1:{port}", "name": name}), flush=True)
            await asyncio.to_thread(sys.stdin.readline)
            node.stop()
            await serving

    asyncio.run(run())


def _child(args: list[str], build: str, under: str | None) -> subprocess.Popen[str]:
    if args[2] == "aio":  # the asyncio client or service
        cmd = [sys.executable, __file__, "--aio-client", *args[4:7:2], args[3]]
        if args[0] == "bind":
            cmd = [sys.executable, __file__, "--aio-service"]
    else:
        cmd = [sys.executable, WIREBENCH, "half", *args]
    if under is not None:
        cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes",
               f"--callgrind-out-file={under}/cg.%p", *cmd]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=build),
                            cwd="/tmp")


def _threads(out_dir: str) -> dict[str, int]:
    """Instructions of each thread callgrind recorded, by thread number."""
    counts = {}
    for path in glob.glob(f"{out_dir}/cg.*"):
        with open(path) as f:
            text = f.read()
        thread = re.search(r"^thread: (\d+)", text, re.M)
        total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
        if thread and total:
            counts[thread.group(1)] = int(total.group(1))
    if not counts:
        raise RuntimeError(f"callgrind wrote no totals in {out_dir}")
    return counts


def instructions(side: str, impl: str, build: str, n: int) -> dict[str, int]:
    """Each thread's instructions of ``side`` (see :func:`_threads`) for 200 + ``n`` round
    trips."""
    with tempfile.TemporaryDirectory(prefix="rrcost-") as out_dir:
        bind = _child(["bind", "rr", "aio" if impl == "aio" and side == "service" else
                       "fabric" if impl == "aio" else impl, str(n)], build,
                      out_dir if side == "service" else None)
        conn = None
        try:
            assert bind.stdout is not None
            info = json.loads(bind.stdout.readline())
            conn = _child(["connect", "rr", impl, str(n), info["url"], "1e9",
                           info.get("name", "")], build, out_dir if side == "client" else None)
            conn.communicate("done\n", timeout=CHILD_TIMEOUT_S)
            bind.communicate("done\n", timeout=CHILD_TIMEOUT_S)
        finally:
            for proc in (bind, conn):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
        return _threads(out_dir)


@click.command()
@click.option("--builds", default=f"new={os.path.dirname(HERE)}",
              help="name=PYTHONPATH,... fabric builds; raw runs once.")
@click.option("--side", "sides", multiple=True, default=["client", "service"],
              type=click.Choice(["client", "service"]))
@click.option("--n1", default=1000, show_default=True)
@click.option("--n2", default=3000, show_default=True)
@click.option("--only", default="", help="Measure only these, e.g. 'raw,new,new aio'.")
def main(builds: str, sides: tuple[str, ...], n1: int, n2: int, only: str) -> None:
    named = dict(item.split("=", 1) for item in builds.split(","))
    impls = [("raw", "raw", next(iter(named.values())))]
    impls += [(name, "fabric", os.path.abspath(path)) for name, path in named.items()]
    for side in sides:
        for name, impl, path in impls + [(f"{n} aio", "aio", p) for n, _, p in impls[1:]]:
            if only and name not in only.split(","):
                continue
            low, high = (instructions(side, impl, path, n) for n in (n1, n2))
            grown = max(high[t] - low.get(t, 0) for t in high)
            print(f"{side} {name}: {grown / (n2 - n1):,.0f} instructions per request",
                  flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--aio-client"]:
        aio_client(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["--aio-service"]:
        aio_service()
    else:
        main()
