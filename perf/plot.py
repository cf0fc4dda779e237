"""One figure from the JSON lines of perf/latency.py and perf/throughput.py (needs matplotlib:
``pip install -e '.[perf]'``), plus the table again on stdout.

    python3 perf/plot.py perf/results-latency.jsonl perf/results-throughput.jsonl \
        -o perf/results.png [--markdown]
"""

from __future__ import annotations

import sys

import bench_plot
import click
import common


@click.command(help=__doc__)
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", default="perf/results.png", show_default=True, help="PNG to write.")
@click.option("--title", default="", help="Figure title.")
@click.option("--markdown", is_flag=True, help="Print markdown tables (for perf/README.md).")
def main(files: tuple[str, ...], output: str, title: str, markdown: bool) -> None:
    rows = common.read_json_rows(files)
    for bench in ("latency", "throughput"):
        part = [r for r in rows if r.bench == bench]
        if part:
            print(common.markdown_table(part) if markdown else "", end="")
            if not markdown:
                common.print_table(part)
            print("\n")
    bench_plot.plot(rows, output, title)
    print(f"plot written to {output}")


if __name__ == "__main__":
    sys.exit(main())
