"""Discovery at scale: N simulated hosts (network namespaces on one bridge), one node each.

Measures, for each N: how long after the last node started every node sees every other
(convergence), each node's time from its own start to a full view, and each node's resident memory
once the fabric has converged. Needs root and iproute2; all traffic stays inside the namespaces.

    sudo python3 perf/lan_scale.py --hosts 10 --hosts 30 [--json]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.lan.netns import Lan, lan_unavailable  # noqa: E402

NODE = """
import json, os, time, zmqfabric as zf
total = {total}
start = time.monotonic()
with zf.Node({name!r}) as node:
    print("READY", json.dumps({{"t": start}}), flush=True)
    node.directory.wait_for(lambda: len(node.directory.records()) >= total, 120)
    full = time.monotonic()
    seen = len(node.directory.records())
    time.sleep(1.0)  # let the liveness connections settle before reading memory
    with open("/proc/self/status") as status:
        rss = next(int(l.split()[1]) for l in status if l.startswith("VmRSS:"))
    print("FULL", json.dumps({{"t": full, "since_start": full - start, "seen": seen,
                               "rss_kib": rss}}), flush=True)
    node.directory.wait_for(lambda: False, {hold})
"""


def run(count: int, hold: float) -> dict[str, float]:
    lan = Lan()
    try:
        switch = lan.switch("s")
        hosts = [lan.host(f"{i}", switch, f"198.18.{1 + i // 250}.{1 + i % 250}/16")
                 for i in range(count)]
        children = [
            lan.python(h, NODE.format(name=f"scale{i}", total=count, hold=hold), ready=False)
            for i, h in enumerate(hosts)
        ]
        starts = [json.loads(c.expect("READY", 120))["t"] for c in children]
        fulls = [json.loads(c.expect("FULL", 180)) for c in children]
    finally:
        lan.close()
    last_start = max(starts)
    converged = max(f["t"] for f in fulls) - last_start
    per_node = [f["since_start"] for f in fulls]
    rss = [f["rss_kib"] / 1024 for f in fulls]
    return {
        "hosts": count,
        "all_seen": all(f["seen"] >= count for f in fulls),
        "converge_after_last_start_s": round(converged, 3),
        "start_to_full_view_p50_s": round(statistics.median(per_node), 3),
        "start_to_full_view_max_s": round(max(per_node), 3),
        "rss_per_node_mib_p50": round(statistics.median(rss), 1),
        "rss_per_node_mib_max": round(max(rss), 1),
    }


@click.command()
@click.option("--hosts", "counts", type=click.IntRange(2, 200), multiple=True,
              default=(10, 30), show_default=True, help="Number of simulated hosts (repeatable).")
@click.option("--hold", type=float, default=2.0, show_default=True,
              help="Seconds each node stays up after converging.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def main(counts: tuple[int, ...], hold: float, as_json: bool) -> None:
    why = lan_unavailable()
    if why:
        raise click.ClickException(why)
    for count in counts:
        row = run(count, hold)
        if as_json:
            click.echo(json.dumps(row))
        else:
            click.echo(
                f"{row['hosts']:>4} hosts: all seen={row['all_seen']}, converged "
                f"{row['converge_after_last_start_s']:.3f} s after the last start; start -> full "
                f"view p50 {row['start_to_full_view_p50_s']:.3f} s, max "
                f"{row['start_to_full_view_max_s']:.3f} s; RSS per node p50 "
                f"{row['rss_per_node_mib_p50']:.1f} MiB, max {row['rss_per_node_mib_max']:.1f} MiB"
            )


if __name__ == "__main__":
    main()
