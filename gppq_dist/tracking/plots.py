"""Figures: a run's training dynamics, an experiment's size / top-1 Pareto front.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
backend switch).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from gppq_dist.io import atomic_path


def _figure(width: float, height: float, rows: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(rows, 1, sharex=rows > 1, squeeze=False)[:, 0]
    return figure, list(axes)


def _save(figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    return path


def dynamics_png(history: Sequence[dict[str, Any]], baseline_top1: float, direct_pq_top1: float,
                 path: str | Path, method: str = "G&P PQ") -> Path:
    """:func:`dynamics_figure` as a PNG file."""
    return _save(dynamics_figure(history, baseline_top1, direct_pq_top1, method), Path(path))


def dynamics_figure(history: Sequence[dict[str, Any]], baseline_top1: float, direct_pq_top1: float,
                    method: str = "G&P PQ"):
    """Top-1 with and without quantization per epoch (epoch 0: the baseline and the model
    the training starts from, direct PQ for G&P PQ), and Gamma per epoch on a log axis
    below: the paper's Figure 2 for one run."""
    epochs = [0] + [int(record["epoch"]) for record in history]
    figure, (accuracy, gamma) = _figure(6.4, 6.0, rows=2)
    accuracy.plot(epochs, [direct_pq_top1] + [r["top1_quantized"] for r in history], "o-",
                  label="with quantization (what ships)")
    accuracy.plot(epochs, [baseline_top1] + [r["top1_raw"] for r in history], "s--",
                  label="without quantization (raw weights)")
    accuracy.set_ylabel("val top-1 (%)")
    accuracy.set_title(f"{method} training dynamics")
    accuracy.grid(True, alpha=0.3)
    accuracy.legend(loc="best")
    points = [(int(r["epoch"]), r["gamma"]) for r in history if r["gamma"] > 0]
    if points:
        gamma.plot(*zip(*points), "o-", color="tab:red")
    gamma.set_yscale("log")
    gamma.set_ylabel("Gamma (distance to codewords)")
    gamma.set_xlabel("epoch")
    gamma.grid(True, which="both", alpha=0.3)
    gamma.set_xticks(epochs)
    return figure


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (smaller or equal size and higher top-1, or
    smaller size and equal top-1), by increasing size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_png(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """:func:`pareto_figure` as a PNG file."""
    return _save(pareto_figure(rows, title), Path(path))


def pareto_figure(rows: Sequence[dict[str, Any]], title: str):
    """Accounted size (MB, log axis) against top-1 with quantization: one marker per method,
    each point labelled with its run, the front drawn as a step line."""
    figure, (axes,) = _figure(7.2, 5.0)
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    for marker, (method, members) in zip("os^Dv<>phX*", sorted(by_method.items())):
        axes.scatter([r["size_mb"] for r in members], [r["top1_quantized"] for r in members],
                     marker=marker, s=45, label=method, zorder=3)
    for row in rows:
        axes.annotate(row["run"], (row["size_mb"], row["top1_quantized"]), textcoords="offset points",
                      xytext=(4, 4), fontsize=7)
    front = [rows[i] for i in pareto_front([(r["size_mb"], r["top1_quantized"]) for r in rows])]
    if front:
        axes.plot([r["size_mb"] for r in front], [r["top1_quantized"] for r in front], "-", color="gray",
                  drawstyle="steps-post", alpha=0.7, label="Pareto front", zorder=2)
    from matplotlib.ticker import FuncFormatter

    axes.set_xscale("log")
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    axes.xaxis.set_major_formatter(plain)
    sizes = [r["size_mb"] for r in rows]
    if sizes and max(sizes) < 10 * min(sizes):  # within a decade: label the minor ticks too
        axes.xaxis.set_minor_formatter(plain)
    axes.margins(x=0.12, y=0.08)
    axes.set_xlabel("accounted size (MB, log scale)")
    axes.set_ylabel("val top-1 with quantization (%)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return figure
