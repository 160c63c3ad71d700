"""PNG plots of a benchmark run: one per ``result["series"]`` entry, plus ``summary.png``.

``render(results, out_dir)`` writes ``<benchmark>-<stem>.png`` for every series
(a "no data" placeholder when a series has no points, so the set of files is
predictable) and ``summary.png``: each figure's median divided by each of its
baselines' medians, on a log scale centred on 1 (same speed/size as the baseline).

Drawing uses the ``Figure`` API with the Agg canvas only: no pyplot, no screen,
no global backend switch.
"""

from __future__ import annotations

import math
import os
import re
import sys
import textwrap
import warnings
from typing import Any

#: Colours of the series lines, in label order (matplotlib's tab10).
COLORS = [f"tab:{c}" for c in ("blue", "orange", "green", "red", "purple", "brown", "pink")]


def render(results: dict[str, Any], out_dir: str) -> list[str]:
    """Write the PNGs of ``results`` under ``out_dir``; return their paths.

    Returns ``[]`` (with a message) when matplotlib is not installed. A series
    that cannot be drawn is reported on stderr and skipped; the others are
    still written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        print("plots: matplotlib is not installed; no plots written", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    benchmarks = results.get("benchmarks") or {}
    for name, result in benchmarks.items():
        if not isinstance(result, dict):
            continue
        for stem, spec in (result.get("series") or {}).items():
            if not isinstance(spec, dict):
                continue
            path = os.path.join(out_dir, png_name(name, stem))
            try:
                _plot_series(spec, path, default_title=f"{name}: {stem}")
            except Exception as exc:  # one bad series must not lose the others
                print(f"plots: {name}/{stem} not drawn: {exc!r}", file=sys.stderr)
                continue
            paths.append(path)
    path = os.path.join(out_dir, "summary.png")
    try:
        _plot_summary(results, path)
    except Exception as exc:
        print(f"plots: summary not drawn: {exc!r}", file=sys.stderr)
    else:
        paths.append(path)
    return paths


def png_name(benchmark: str, stem: str) -> str:
    """File name of one series' plot: ``<benchmark>-<stem>.png``, unsafe characters replaced."""
    return f"{_safe(benchmark)}-{_safe(stem)}.png"


def ratios(results: dict[str, Any]) -> list[tuple[str, float, str]]:
    """``(label, figure median / baseline median, unit)`` for every figure with a baseline."""
    out = []
    for name, result in (results.get("benchmarks") or {}).items():
        if not isinstance(result, dict):
            continue
        for fig in result.get("figures") or []:
            if not isinstance(fig, dict):
                continue
            med = median_of(fig.get("value"))
            if med is None:
                continue
            for base, summary in (fig.get("baseline") or {}).items():
                bmed = median_of(summary)
                if bmed is None or bmed == 0:
                    continue
                ratio = med / bmed
                if ratio > 0 and math.isfinite(ratio):
                    label = f"{name}: {fig.get('name', '?')} / {base}"
                    out.append((label, ratio, str(fig.get("unit", ""))))
    return out


def median_of(value: Any) -> float | None:
    """The median of a ``summarize`` dict or a bare number; None when absent or not finite."""
    if isinstance(value, dict):
        value = value.get("median")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str) -> None:
    with warnings.catch_warnings():
        # tight_layout only warns when it cannot improve the layout; the PNG is still fine.
        warnings.simplefilter("ignore")
        fig.tight_layout()
    fig.savefig(path, dpi=110)


def _no_data(ax: Any, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _plot_series(spec: dict[str, Any], path: str, *, default_title: str) -> None:
    fig = _new_figure(10, 4.5)
    ax = fig.subplots()
    logx = bool(spec.get("logx"))
    hist = spec.get("kind", "line") == "hist"
    if hist:
        drawn = _draw_hist(ax, spec.get("values") or {}, logx)
    else:
        drawn = _draw_lines(ax, spec.get("lines") or {}, logx)
    if drawn:
        ax.set_xlabel(str(spec.get("xlabel") or ""))
        ax.set_ylabel(str(spec.get("ylabel") or ("count" if hist else "")))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(loc="best", fontsize=8)
    else:
        _no_data(ax)
    ax.set_title(str(spec.get("title") or default_title))
    _save(fig, path)


def _draw_lines(ax: Any, lines: dict[str, Any], logx: bool) -> bool:
    drawn = False
    all_x: list[float] = []
    for i, (label, points) in enumerate(lines.items()):
        pts = [
            (float(p[0]), float(p[1]))
            for p in points or []
            if isinstance(p, list | tuple) and len(p) >= 2 and _finite(p[0]) and _finite(p[1])
        ]
        if logx:
            pts = [p for p in pts if p[0] > 0]
        if not pts:
            continue
        pts.sort()
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        all_x += xs
        ax.plot(xs, ys, marker="o", ms=4, lw=1.5, color=COLORS[i % len(COLORS)], label=str(label))
        drawn = True
    if drawn and logx and min(all_x) < max(all_x):
        ax.set_xscale("log")
        _log_ticks(ax, all_x)
    return drawn


def _draw_hist(ax: Any, values: dict[str, Any], logx: bool) -> bool:
    import numpy as np

    samples = {}
    hidden = {}
    for label, vals in values.items():
        clean = [float(v) for v in vals or [] if _finite(v)]
        if logx:
            hidden[str(label)] = sum(1 for v in clean if v <= 0)
            clean = [v for v in clean if v > 0]
        if clean:
            samples[str(label)] = clean
    if not samples:
        return False
    everything = np.array([v for vals in samples.values() for v in vals])
    n_bins = int(min(40, max(8, math.sqrt(len(everything)) * 2)))
    lo, hi = float(everything.min()), float(everything.max())
    use_log = logx and lo < hi
    if use_log:
        bins = np.geomspace(lo, hi, n_bins + 1)
    else:
        bins = np.histogram_bin_edges(everything, bins=n_bins)
    for i, (label, vals) in enumerate(samples.items()):
        color = COLORS[i % len(COLORS)]
        med = float(np.median(vals))
        ax.hist(
            vals,
            bins=bins,
            alpha=0.5,
            color=color,
            edgecolor=color,
            label=f"{label} (n={len(vals)}, median {med:.3g})"
            + (f", {hidden[label]} <= 0 not shown" if hidden.get(label) else ""),
        )
        ax.axvline(med, color=color, ls="--", lw=1)
    if use_log:
        ax.set_xscale("log")
        _log_ticks(ax, [float(b) for b in bins], at_points=False)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return True


def _plot_summary(results: dict[str, Any], path: str) -> None:
    rows = ratios(results)
    labels = [textwrap.fill(f"{label} ({unit})" if unit else label, 60) for label, _, unit in rows]
    height = max(2.5, 1.4 + 0.3 * sum(label.count("\n") + 1 for label in labels))
    fig = _new_figure(12, height)
    ax = fig.subplots()
    title = "Iris figure / baseline, medians: 1 = same as the baseline, right of 1 = Iris larger"
    if results.get("smoke"):
        title += "\n(smoke run: not meaningful)"
    fig.suptitle(title, fontsize=10)
    if not rows:
        _no_data(ax, "no figure has a measured baseline")
        _save(fig, path)
        return
    rows, labels = rows[::-1], labels[::-1]  # first figure on top
    ys = list(range(len(rows)))
    values = [r[1] for r in rows]
    # Bars grow from 1 so that 2x and 0.5x are the same length on the log scale.
    ax.barh(ys, [v - 1 for v in values], left=1, color="tab:blue", alpha=0.8, height=0.6)
    ax.axvline(1, color="black", lw=1)
    ax.set_xscale("log")
    lo, hi = min([*values, 1.0]) / 2.5, max([*values, 1.0]) * 2.5
    ax.set_xlim(lo, hi)
    _log_ticks(ax, [lo, hi], at_points=False, suffix="x")
    for y, v in zip(ys, values, strict=True):
        ax.text(
            v * (1.08 if v >= 1 else 1 / 1.08),
            y,
            f"{v:.3g}x",
            va="center",
            ha="left" if v >= 1 else "right",
            fontsize=8,
        )
    ax.set_yticks(ys, labels)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("figure / baseline (log scale)")
    ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)


def _log_ticks(ax: Any, xs: list[float], *, at_points: bool = True, suffix: str = "") -> None:
    """Readable ticks on a log x axis: the data's own x values when there are few, else 1-2-5."""
    from benchmarks.report import fmt

    distinct = sorted({x for x in xs if x > 0})
    if not distinct:
        return
    if at_points and len(distinct) <= 8:
        ticks = distinct
    else:
        lo, hi = distinct[0], distinct[-1]
        ticks = [
            m * 10.0**e
            for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in (1, 2, 5)
            if lo <= m * 10.0**e <= hi
        ]
        if len(ticks) > 12:
            ticks = [t for t in ticks if math.log10(t).is_integer()]
    ax.set_xticks(ticks, [fmt(t) + suffix for t in ticks])
    ax.set_xticks([], minor=True)


def _safe(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._") or "series"
