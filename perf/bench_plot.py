"""The perf scripts' plot (matplotlib, optional): one figure of latency and throughput against
body size, raw next to fabric, and the fabric/raw ratios with their targets. Split from
common.py (module size)."""

from __future__ import annotations

from typing import Any

from common import IMPLS, TRANSPORTS, Row, size_label

_ORDER = {
    ("latency", "reqrep"): 0,
    ("latency", "pubsub"): 1,
    ("throughput", "pushpull"): 2,
    ("throughput", "pubsub"): 3,
}


def plot(rows: list[Row], path: str, title: str = "") -> None:
    """One figure. A row of panels per (bench, pattern), a column per transport: latency p50
    (solid) and p99 (dashed) or messages/s against body size, raw grey, fabric blue. A last row
    gives fabric/raw against size for every pattern and transport, with the targets."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[perf]'") from None

    panels = sorted({(r.bench, r.pattern) for r in rows}, key=lambda p: _ORDER.get(p, 9))
    transports = [t for t in TRANSPORTS if any(r.transport == t for r in rows)]
    ncols = max(3, len(transports))
    fig, axes = plt.subplots(
        len(panels) + 1, ncols, squeeze=False, figsize=(4.4 * ncols, 3.1 * (len(panels) + 1))
    )
    colors = {"raw": "#8c8c8c", "fabric": "#1f5fbf"}
    sizes = sorted({r.size for r in rows})
    labels = [size_label(s).replace(" ", "") for s in sizes]

    def size_axis(ax: Any) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(True, which="both", alpha=0.25)

    for i, (bench, pattern) in enumerate(panels):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(transports):
                ax.axis("off")
                continue
            transport = transports[j]
            sel = [
                r for r in rows if (r.bench, r.pattern, r.transport) == (bench, pattern, transport)
            ]
            for impl in IMPLS:
                pts = sorted(((r.size, r) for r in sel if r.impl == impl), key=lambda p: p[0])
                if not pts:
                    continue
                xs = [s for s, _ in pts]
                if bench == "latency":
                    ax.plot(
                        xs,
                        [r.p50_us for _, r in pts],
                        "-o",
                        color=colors[impl],
                        ms=3,
                        label=f"{impl} p50",
                    )
                    ax.plot(
                        xs,
                        [r.p99_us for _, r in pts],
                        "--",
                        color=colors[impl],
                        lw=1,
                        label=f"{impl} p99",
                    )
                else:
                    ax.plot(
                        xs,
                        [r.msgs_per_s for _, r in pts],
                        "-o",
                        color=colors[impl],
                        ms=3,
                        label=impl,
                    )
            size_axis(ax)
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if j == 0:
                what = (
                    ("round trip µs" if pattern == "reqrep" else "one-way µs")
                    if bench == "latency"
                    else "messages/s"
                )
                ax.set_ylabel(f"{bench} {pattern}\n{what}", fontsize=9)
            ax.set_title(f"{bench} {pattern}, {transport}", fontsize=9)
            if j == 0:
                ax.legend(fontsize=7)

    # The last row: fabric/raw, what the targets are about.
    last = axes[len(panels)]
    ratio_panels = [
        ("latency", "ratio", "latency p50 fabric/raw (lower is better)", [1.10]),
        ("latency", "ratio_p99", "latency p99 fabric/raw", [1.25]),
        ("throughput", "ratio", "msgs/s fabric/raw (higher is better)", [0.90, 0.95]),
    ]
    styles = {"tcp": "-o", "ipc": "--s", "inproc": ":^"}
    pattern_colors = {"reqrep": "#1f5fbf", "pubsub": "#d9822b", "pushpull": "#2b9d4a"}
    for j in range(ncols):
        ax = last[j]
        if j >= len(ratio_panels):
            ax.axis("off")
            continue
        bench, key, name, targets = ratio_panels[j]
        fab = [r for r in rows if r.bench == bench and r.impl == "fabric"]
        if not fab:
            ax.axis("off")
            continue
        for pattern in sorted({r.pattern for r in fab}):
            for transport in transports:
                found = sorted(
                    (r.size, r.ratio if key == "ratio" else r.extra.get(key))
                    for r in fab
                    if (r.pattern, r.transport) == (pattern, transport)
                )
                ratios = [(x, y) for x, y in found if y is not None]
                if ratios:
                    ax.plot(
                        [x for x, _ in ratios],
                        [y for _, y in ratios],
                        styles[transport],
                        color=pattern_colors.get(pattern, "k"),
                        ms=3,
                        lw=1,
                        label=f"{pattern} {transport}",
                    )
        for target in targets:
            ax.axhline(target, color="#c0392b", lw=0.8, ls="-.")
        ax.axhline(1.0, color="k", lw=0.6)
        size_axis(ax)
        ax.set_ylim(bottom=0)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(
        title
        or "zmqfabric vs raw pyzmq, same run, alternating (medians of runs); red: targets (tcp)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
