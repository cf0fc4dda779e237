"""How fast a one-shot ``zmqfabric`` command finishes against a provider already running on this
host: wall time of whole processes (Python start, imports, discovery, the call, shutdown).

    python3 perf/cli_startup.py                 # 10 timed runs of each command, 20 of --timeout 1
    python3 perf/cli_startup.py --runs 5 --short-runs 0 --commands req,ping

It starts one provider process (service ``echo``, pipeline ``frames`` with a puller, task
``work`` with a worker, a subscriber of stream ``prices``, all on loopback under a fabric of
its own), waits until it is up, then runs each command ``--runs`` times one after the other
(back to back, as a script would) and prints the median and the maximum. ``--short-runs``
runs each command with ``--timeout 1`` that many times and counts the ones that did not
succeed (for ``pub``: that published before its subscriber had subscribed). Also the
time of ``python -c 'import zmqfabric'``. Not a test: it measures, on whatever else the
machine is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time

PROVIDER = r"""
import sys, threading
import zmqfabric as zf
node = zf.Node(sys.argv[1])
@node.reply("echo")
def echo(body):
    return body
@node.task("work")
def work(body):
    return body
node.start()
stop = threading.Event()
def pull():
    with node.puller("frames") as puller:
        while not stop.is_set():
            puller.recv_message(0.2)
def sub():
    with node.subscribe("prices") as s:
        while not stop.is_set():
            s.recv_message(0.2)
threads = [threading.Thread(target=pull), threading.Thread(target=sub)]
for t in threads:
    t.start()
print("ready", flush=True)
try:
    node.run()
finally:
    stop.set()
    for t in threads:
        t.join(5)
    node.close()
"""

#: A short-lived Python client: a new observer node and its first request.
PY_CLIENT = r"""
import zmqfabric as zf
with zf.Node("pyclient", advertise=False) as node:
    node.request("echo", {"a": 1}, timeout=5.0)
"""

COMMANDS = {
    "req": ["req", "echo", '{"a": 1}'],
    "push": ["push", "frames", '{"a": 1}'],
    "pub": ["pub", "prices", "EUR", '{"a": 1}'],
    "submit": ["submit", "work", '{"a": 1}'],
    "ping": ["ping", "{provider}"],
    "python": ["-c", PY_CLIENT],  # not a CLI command: ``python -c`` a client
}


def run(cmd: list[str], env: dict[str, str], timeout: float = 30.0) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    return time.perf_counter() - start, proc.returncode, proc.stderr.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--short-runs", type=int, default=20)
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    fabric = f"perf-{secrets.token_hex(3)}"
    env = {**os.environ, "ZMQFABRIC_FABRIC": fabric}
    env.pop("ZMQFABRIC_INTERFACE", None)
    provider = f"prov-{secrets.token_hex(3)}"
    cli = [sys.executable, "-m", "zmqfabric"]
    results: dict[str, object] = {"fabric": fabric}
    imports = [run([sys.executable, "-c", "import zmqfabric"], env)[0] for _ in range(args.runs)]
    results["import"] = {"median_s": statistics.median(imports), "max_s": max(imports)}
    child = subprocess.Popen([sys.executable, "-c", PROVIDER, provider], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("the provider did not start")
        for name in args.commands.split(","):
            argv = [a.replace("{provider}", provider) for a in COMMANDS[name]]
            prefix = [sys.executable] if name == "python" else cli
            times, failed = [], []
            for _ in range(args.runs):
                took, code, err = run([*prefix, *argv], env)
                times.append(took)
                if code != 0:
                    failed.append(f"exit {code}: {err[-200:]}")
            results[name] = {"median_s": statistics.median(times), "max_s": max(times),
                             "failed": failed}
        for name in args.commands.split(",") if args.short_runs else ():
            if name == "python":
                continue
            argv = [a.replace("{provider}", provider) for a in COMMANDS[name]]
            bad = []
            for _ in range(args.short_runs):
                _, code, err = run([*cli, "--timeout", "1", *argv], env)
                if code != 0 or "warning: 0 of" in err:  # pub: nobody subscribed in time
                    bad.append(f"exit {code}: {err[-200:]}")
            results[f"{name} --timeout 1"] = {"runs": args.short_runs, "failed": bad}
    finally:
        child.terminate()
        child.wait(10)
    if args.json:
        print(json.dumps(results))
        return
    for name, value in results.items():
        if isinstance(value, dict) and "median_s" in value:
            fails = value.get("failed") or []
            extra = f"; {len(fails)} failed: {fails[0]}" if fails else ""
            print(f"{name:<8} median {value['median_s']:.3f} s, max {value['max_s']:.3f} s{extra}")
        elif isinstance(value, dict):
            fails = value["failed"]
            print(f"{name}: {value['runs'] - len(fails)} of {value['runs']} succeeded"
                  + (f"; e.g. {fails[0]}" if fails else ""))


if __name__ == "__main__":
    main()
