"""The command line and the case matrix shared by ``perf/latency.py`` and
``perf/throughput.py``; the process plumbing lives in three modules of its own:
``bench_env`` (a half's environment, transports, shared timeouts), ``bench_workers`` (running
halves in threads or in a raw worker child) and ``bench_server`` (the server, the probe's
session, one case of one implementation).

Every case has two halves: a *bind* half (echo service, publisher, puller) and a *connect* half
(requester, subscriber, pusher). Halves are plain functions ``half(env, case, announce, stop)``
run in a thread of a worker process:

- raw halves run in a **raw worker**: a child process (``SCRIPT worker``) that imports no fabric
  node at all, so the raw baseline pays for no zeroconf or control thread;
- fabric halves run in the process that owns a :class:`zmqfabric.Node`: the server (``SCRIPT
  serve --name X``) or the probe (``SCRIPT probe X``, or the default local run, which starts a
  server itself). The fabric's background threads are part of the fabric's cost.

The probe finds the server by discovery (its ``X-ctl`` reply service) and drives the server's
halves over that service; the server forwards raw halves to its raw worker as JSON lines. ipc
cases need both on one host; inproc cases run both halves in one local process.

Over tcp the fabric binds and connects exactly as users see it (scope address, discovery). For
ipc and inproc the fabric has no public hook, so ``bench_env.fabric_expose`` / ``fabric_connect``
bind one more address on the handle's own socket and apply a connect in the owning thread (the
same private step discovery takes); over tcp they fall back to that when discovery is too
slow. Messages still go through the handles' real send/receive code; only the address differs.

Everything is bounded: workers die on SIGALRM after ``--max-seconds``, every wait has a timeout,
and every child is stopped with quit, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping, Protocol

from bench_env import RUN_ATTEMPTS, WORKER_MAX_S, Half
from bench_server import Session, run_pair, serve_main
from bench_workers import worker_main


class Bench(Protocol):
    """What a bench script provides to :func:`make_cli`."""

    name: str

    @property
    def patterns(self) -> tuple[str, ...]: ...
    @property
    def halves(self) -> Mapping[str, Half]: ...

    def plan_case(self, pattern: str, transport: str, size: int, quick: bool) -> dict[str, Any]: ...
    def pair(self, pattern: str) -> tuple[str, str, str]: ...
    def figures(self, case: dict[str, Any], bind: dict, connect: dict) -> dict[str, float]: ...
    def targets(self, rows: list[Any]) -> list[tuple[str, float | None, str, bool | None]]: ...


def drive(session: Session, bench: Bench, opts: dict[str, Any]) -> list[Any]:
    """Run the matrix: per case, raw and fabric alternate; headline cases run ``runs`` times."""
    import common

    quick = opts["quick"]
    sizes = common.parse_sizes(opts["sizes"], quick)
    transports = common.parse_list(opts["transports"], common.TRANSPORTS, common.TRANSPORTS)
    patterns = common.parse_list(opts["patterns"], bench.patterns, bench.patterns)
    if "ipc" in transports and not session.ipc_ok:
        common.note(f"server {session.server} is on another host: skipping ipc")
        transports = tuple(t for t in transports if t != "ipc")
    rows = []
    case_id = 0
    for pattern in patterns:
        bind_half, connect_half, measured_by = bench.pair(pattern)
        for transport in transports:
            for size in sizes:
                skip = getattr(bench, "skip", lambda *_: None)(pattern, transport, size)
                if skip:
                    common.note(f"{bench.name} {pattern} {transport} {size}: skipped ({skip})")
                    continue
                runs = opts["runs"] if (transport, size) in common.HEADLINE else opts["other_runs"]
                per_impl: dict[str, list[dict[str, float]]] = {impl: [] for impl in common.IMPLS}
                for run, impl in common.alternate(runs):
                    for attempt in range(1, RUN_ATTEMPTS + 1):
                        case_id += 1
                        case = bench.plan_case(pattern, transport, size, quick)
                        case["id"] = f"{os.getpid() % 100000}-{case_id}"
                        try:
                            bind, connect = run_pair(
                                session,
                                impl,
                                transport,
                                bind_half,
                                connect_half,
                                case,
                                measured_by,
                                case["bound_s"] + 10,
                            )
                            figs = bench.figures(case, bind, connect)
                            break
                        except Exception as exc:  # e.g. a discovery update lost under load
                            common.note(
                                f"{bench.name} {pattern} {transport} {size} {impl}: "
                                f"attempt {attempt} failed: {exc}"
                            )
                            if attempt == RUN_ATTEMPTS:
                                raise
                    per_impl[impl].append(figs)
                    common.note(
                        f"{bench.name} {pattern} {transport} {common.size_label(size)} "
                        f"{impl} run {run + 1}/{runs}: "
                        + ", ".join(
                            f"{k} {v:,.1f}"
                            for k, v in figs.items()
                            if isinstance(v, (int, float)) and k != "samples"
                        ),
                        opts["json"] and not opts["verbose"],
                    )
                for impl in common.IMPLS:
                    merged = common.merge_runs(per_impl[impl])
                    row = common.Row(bench.name, pattern, transport, size, impl)
                    for key, value in merged.items():
                        if key in common.FIELDS:
                            setattr(row, key, value)
                        else:
                            row.extra[key] = value
                    rows.append(row)
    common.add_ratios(rows)
    return rows


def make_cli(script: str, bench: Bench) -> Any:
    import click
    import common

    def bench_options(fn: Any) -> Any:
        options = [
            click.option("--quick", is_flag=True, help="Reduced matrix (64 B and 1 MiB), < 60 s."),
            click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout."),
            click.option(
                "--plot", "plot_file", metavar="FILE.png", help="Write a plot (matplotlib)."
            ),
            click.option(
                "--runs",
                default=3,
                show_default=True,
                help="Runs of each headline case (tcp, 64 B and 1 MiB); medians are reported.",
            ),
            click.option("--other-runs", default=1, show_default=True, help="Runs of other cases."),
            click.option("--sizes", help="Comma list, e.g. 64,4k,1m (default 64 B .. 1 MiB)."),
            click.option("--transports", help="Comma list of tcp,ipc,inproc (default all)."),
            click.option(
                "--patterns", help=f"Comma list of {','.join(bench.patterns)} (default all)."
            ),
            click.option("--verbose", is_flag=True, help="Per-run progress even with --json."),
        ]
        for option in reversed(options):
            fn = option(fn)
        return fn

    def run(server: str, spawn: bool, opts: dict[str, Any]) -> None:
        opts = dict(opts, json=opts.pop("as_json"))
        started = time.monotonic()
        common.note(f"{bench.name}: {common.machine_note()}", opts["json"] and not opts["verbose"])
        session = Session(script, server, bench.halves, spawn, WORKER_MAX_S)
        ok = False
        try:
            rows = drive(session, bench, opts)
            ok = True
        finally:
            session.close()
            if session.stuck and not ok:
                sys.stderr.flush()
                os._exit(1)  # a stuck thread would keep this process alive
        if opts["json"]:
            common.emit_json(rows)
        else:
            common.print_table(rows)
            common.print_targets(bench.targets(rows))
            print(
                f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s; {common.machine_note()}"
            )
        if opts["plot_file"]:
            import bench_plot  # matplotlib only when asked

            bench_plot.plot(rows, opts["plot_file"])
            common.note(f"plot written to {opts['plot_file']}", opts["json"])
        if session.stuck:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    @click.group(invoke_without_command=True, help=sys.modules["__main__"].__doc__)
    @bench_options
    @click.pass_context
    def cli(ctx: click.Context, **opts: Any) -> None:
        if ctx.invoked_subcommand is None:
            run(f"perf-{os.getpid() % 100000}-{os.urandom(2).hex()}", True, opts)

    @cli.command(help="Serve the remote halves of every case (two-host mode).")
    @click.option("--name", required=True, help="Node name the probe looks for.")
    @click.option("--max-seconds", default=1800, show_default=True, help="Stop after this long.")
    def serve(name: str, max_seconds: int) -> None:
        serve_main(script, name, bench.halves, max_seconds)

    @cli.command(help="Measure against a running `serve --name SERVER`, found by discovery.")
    @click.argument("server")
    @bench_options
    def probe(server: str, **opts: Any) -> None:
        run(server, False, opts)

    @cli.command(hidden=True)
    @click.option("--address", default="127.0.0.1")
    def worker(address: str) -> None:
        worker_main(bench.halves, address)

    return cli
