"""PNG plots of a history: latency over time (ok/fail/info, fault windows shaded) and throughput."""

from __future__ import annotations

import os

from .history import History


def write_plots(history: History, out: str, *, title: str) -> list[str]:
    """Write ``latency.png`` and ``throughput.png`` under ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(inv, done) for inv, done in history.pairs() if inv.process >= 0]
    windows = history.fault_windows()
    end = max((op.time for op in history.ops), default=1.0)
    paths = []

    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = {"ok": "tab:blue", "fail": "tab:red", "info": "tab:orange"}
    for kind, color in colors.items():
        xs, ys = [], []
        for inv, done in pairs:
            if done is not None and done.type == kind:
                xs.append(inv.time)
                ys.append(max(1e-4, done.time - inv.time) * 1000)
        if xs:
            ax.scatter(xs, ys, s=4, c=color, label=f"{kind} ({len(xs)})", alpha=0.6)
    for start, stop, name in windows:
        ax.axvspan(start, stop if stop is not None else end, color="grey", alpha=0.15)
        ax.text(start, 1.02, name, transform=ax.get_xaxis_transform(), fontsize=7, rotation=30)
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{title}: latency")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(10, 3.5))
    bucket = 0.5
    nb = int(end / bucket) + 1
    for kind, color in colors.items():
        counts = [0] * nb
        for _inv, done in pairs:
            if done is not None and done.type == kind:
                counts[min(nb - 1, int(done.time / bucket))] += 1
        ax.plot(
            [i * bucket for i in range(nb)],
            [c / bucket for c in counts],
            color=color,
            label=kind,
            lw=1,
        )
    for start, stop, _name in windows:
        ax.axvspan(start, stop if stop is not None else end, color="grey", alpha=0.15)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("ops/s")
    ax.set_title(f"{title}: throughput")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths
