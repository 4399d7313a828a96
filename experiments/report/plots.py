"""PNG plots for the report: learning curves across runs, the collapse diagnostics of searches, and the alpha
softmax of a search as a heatmap.

Figures are built with `matplotlib.figure.Figure` (the Agg canvas, no pyplot), so importing this module changes no
global backend and leaks no open figures. Each function returns a `Plot` naming the lines it really drew.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, MaxNLocator

from experiments.report.runs import Run, metric_kind
from shared.genotypes import CNN_PRIMITIVES, RNN_PRIMITIVES

LOG_RATIO = 3.0  # a perplexity panel whose largest value is this many times its smallest gets a log axis
ANNOTATE_MAX_CELLS = 160  # write the weight into each heatmap cell up to this many cells (the CNN's 14 x 8 fits)
# The per-epoch collapse signals a search records (shared.collapse, the tasks' genotype metrics), in panel order.
COLLAPSE_METRICS = ("hessian_eigenvalue", "edge_entropy", "edge_entropy_min", "skip_connect_normal",
                    "parameter_free_normal", "parameter_free_reduce", "identity_ops", "identity_share")
PANELS_PER_ROW = 4


@dataclass(frozen=True)
class Plot:
    """A written PNG (its file name in the report folder) and, per panel title, the labels of its plotted lines."""

    file: str
    panels: dict[str, tuple[str, ...]]


def curve_metrics(runs: list[Run], kind: str) -> list[str]:
    """The per-epoch metrics of `kind` ('ppl' | 'acc') any run has, valid_* first, then train_*, then the rest;
    test_* metrics (one value at the end) are table material, not curves."""
    names = {name for run in runs for name in run.metrics if metric_kind(name) == kind and not name.startswith("test_")}
    rank = {"valid": 0, "train": 1}
    return sorted(names, key=lambda name: (rank.get(name.split("_", 1)[0], 2), name))


def curve_plots(runs: list[Run], out: Path) -> list[Plot]:
    """curves_ppl.png (log scale) and curves_acc.png, one panel per metric, one line per run that has it."""
    plots = []
    for kind in ("ppl", "acc"):
        names = curve_metrics(runs, kind)
        if names:
            plots.append(_curves(runs, names, kind, out / f"curves_{kind}.png"))
    return plots


def _curves(runs: list[Run], names: list[str], kind: str, path: Path) -> Plot:
    fig = Figure(figsize=(5.5 * len(names), 4.2), layout="constrained")
    panels = {}
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        values: list[float] = []
        for run in runs:
            series = run.metrics.get(name)
            if series:
                finite = [v if math.isfinite(v) else math.nan for v in series.values]
                ax.plot(series.steps, finite, marker="o", markersize=3, label=f"{run.label} {run.experiment}")
                values += [v for v in finite if not math.isnan(v)]
        if kind == "ppl" and name.startswith("valid"):
            values += _unigram_lines(ax, [run for run in runs if name in run.metrics])
        if kind == "ppl" and values and min(values) > 0 and max(values) / min(values) > LOG_RATIO:
            ax.set_yscale("log")  # perplexities span orders of magnitude early in training
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.6)))
        ax.set(xlabel="epoch", ylabel=name, title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        panels[name] = tuple(line.get_label() for line in ax.get_lines())
    fig.savefig(path, dpi=100)
    return Plot(path.name, panels)


def _unigram_lines(ax: Any, runs: list[Run]) -> list[float]:
    """A dotted line per distinct unigram valid perplexity of `runs` (run info `unigram_valid_ppl`): the floor a
    language model must beat. Returns the values drawn."""
    found = {round(float(value), 1) for run in runs
             if isinstance(value := run.info.get("unigram_valid_ppl"), (int, float)) and math.isfinite(value)}
    for value in sorted(found):
        ax.axhline(value, color="0.4", linestyle=":", linewidth=1.2, label=f"unigram {value:g}")
    return sorted(found)


def early_stop(run: Run) -> dict[str, Any] | None:
    """The run's early-stop decision (run info `early_stop`), if a rule ended it."""
    stop = run.info.get("early_stop")
    return stop if isinstance(stop, dict) and isinstance(stop.get("genotype_epoch"), int) else None


def collapse_plot(runs: list[Run], path: Path) -> Plot | None:
    """collapse.png: one panel per collapse metric any run has, one line per run; a dashed line in the run's colour
    marks (and the legend names) the epoch whose genotype an early stop returned. None when no run has such a
    metric."""
    names = [name for name in COLLAPSE_METRICS if any(name in run.metrics for run in runs)]
    if not names:
        return None
    rows = math.ceil(len(names) / PANELS_PER_ROW)
    columns = min(len(names), PANELS_PER_ROW)
    fig = Figure(figsize=(5.0 * columns, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    panels = {}
    for ax, name in zip(axes, names):
        for run in runs:
            series = run.metrics.get(name)
            if not series:
                continue
            finite = [v if math.isfinite(v) else math.nan for v in series.values]
            (line,) = ax.plot(series.steps, finite, marker="o", markersize=3, label=f"{run.label} {run.experiment}")
            stop = early_stop(run)
            if stop is not None:
                ax.axvline(stop["genotype_epoch"], color=line.get_color(), linestyle="--", linewidth=1,
                           label=f"{run.label} early stop: epoch {stop['genotype_epoch']}")
        ax.set(xlabel="epoch", ylabel=name, title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        panels[name] = tuple(line.get_label() for line in ax.get_lines())
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)
    return Plot(path.name, panels)


def op_names(run: Run, alpha_name: str, columns: int) -> list[str]:
    """Column labels: the run's config `primitives`, else the search space's primitives, else 'op k'."""
    configured = run.config.get("primitives")
    space = RNN_PRIMITIVES if alpha_name == "alphas" else CNN_PRIMITIVES
    for names in (configured, space):
        if isinstance(names, (list, tuple)) and len(names) == columns:
            return [str(name) for name in names]
    return [f"op {k}" for k in range(columns)]


def edge_names(alpha_name: str, rows: int) -> list[str]:
    """Row labels 'input→node' in the supernets' row order (node by node, inputs in index order)."""
    rnn = alpha_name == "alphas"
    steps = next((s for s in range(1, rows + 1) if (s * (s + 1) if rnn else s * (s + 3)) // 2 == rows), None)
    if steps is None:
        return [f"edge {r}" for r in range(rows)]
    if rnn:  # node i (1..steps) reads states 0..i-1
        return [f"{j}→{i}" for i in range(1, steps + 1) for j in range(i)]
    inputs = ["c_{k-2}", "c_{k-1}"]  # node i (0..steps-1) reads both cell inputs and nodes 0..i-1
    return [f"{inputs[j] if j < 2 else j - 2}→{i}" for i in range(steps) for j in range(i + 2)]


def alpha_heatmap(run: Run, path: Path) -> Plot:
    """The run's last-epoch alpha softmax, one panel per alpha (rows = edges, columns = ops)."""
    assert run.alphas is not None
    epoch, matrices = run.alphas
    names = sorted(matrices)
    shapes = [np.asarray(matrices[name], dtype=float).shape for name in names]
    width = (3.5 + 0.6 * max(cols for _, cols in shapes)) * len(names)
    fig = Figure(figsize=(width, 3.0 + 0.3 * max(rows for rows, _ in shapes)), layout="constrained")
    fig.suptitle(f"{run.label} {run.experiment}: softmax of the alphas, epoch {epoch if epoch is not None else '?'}")
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        _heatmap(fig, ax, run, name, np.asarray(matrices[name], dtype=float))
    fig.savefig(path, dpi=100)
    return Plot(path.name, {name: () for name in names})


def _heatmap(fig: Figure, ax: Any, run: Run, name: str, weights: np.ndarray) -> None:
    image = ax.imshow(weights, aspect="auto", cmap="viridis")
    ax.set_xticks(range(weights.shape[1]), op_names(run, name, weights.shape[1]), rotation=45, ha="right")
    ax.set_yticks(range(weights.shape[0]), edge_names(name, weights.shape[0]))
    ax.set(xlabel="op", ylabel="edge (input→node)", title=name)
    if weights.size <= ANNOTATE_MAX_CELLS:
        middle = (np.nanmax(weights) + np.nanmin(weights)) / 2
        for (r, c), value in np.ndenumerate(weights):
            ax.text(c, r, f"{value:.3f}", ha="center", va="center", fontsize=7,
                    color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, label="softmax weight")
