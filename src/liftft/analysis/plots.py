"""The analyses' figures as PNG files, drawn with matplotlib's object API so that
no global backend or pyplot state is touched."""

from __future__ import annotations

import math

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

DPI = 120


def plot_perturbation(results: dict, path, *, mode: str, unperturbed: float | None = None) -> None:
    """Perplexity (log axis) against noise scale, one line per selector; bars per selector for mode ``zero``."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    if mode == "zero":
        selectors = list(results)
        heights = [results[s][0]["perplexity"] for s in selectors]
        ax.bar(selectors, heights, color=[f"C{i}" for i in range(len(selectors))])
        ax.set_xlabel("selector (its k entries set to zero)")
    else:
        for selector, points in results.items():
            ax.plot([p["noise"] for p in points], [p["perplexity"] for p in points], marker="o", label=selector)
        ax.set_xlabel("noise scale s")
    if unperturbed is not None:
        ax.axhline(unperturbed, color="gray", linestyle=":", label="unperturbed")
    ax.set_yscale("log")
    _plain_labels_within_a_decade(ax)
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perturbation sensitivity ({mode})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.savefig(path, dpi=DPI)


def plot_update_rank(runs: dict[str, dict], path) -> None:
    """Per layer type, grouped bars (one per run) of ΔW's mean effective rank, stable rank and relative norm."""
    panels = [("effective_rank", "effective rank of ΔW"), ("stable_rank", "stable rank of ΔW"),
              ("relative_delta_norm", "‖ΔW‖ / ‖W‖")]
    types = _ordered_union(run["by_type"] for run in runs.values())
    fig = Figure(figsize=(max(6.0, 1.1 * len(types)), 3.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True)
    width = 0.8 / len(runs)
    for ax, (metric, title) in zip(axes, panels):
        for i, (label, run) in enumerate(runs.items()):
            xs = [t + (i - (len(runs) - 1) / 2) * width for t in range(len(types))]
            heights = [_value(run["by_type"].get(name, {}).get(metric)) for name in types]
            ax.bar(xs, heights, width, label=label, color=f"C{i}")
        ax.set_ylabel(title)
    axes[-1].set_xticks(range(len(types)), types)
    axes[0].set_title("Update rank per layer type (mean over depth)")
    axes[0].legend()
    fig.savefig(path, dpi=DPI)


def plot_alignment(runs: dict[str, dict], path) -> None:
    """One panel per layer type: alignment of top singular subspaces (left solid, right dashed) against depth, one colour per run."""
    types = _ordered_union(run["by_type"] for run in runs.values())
    cols = min(4, len(types))
    rows = math.ceil(len(types) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).flatten()
    for ax, name in zip(axes, types):
        for i, (label, run) in enumerate(runs.items()):
            points = sorted(
                (row["depth"], row["left_alignment"], row["right_alignment"])
                for row in run["matrices"].values()
                if row["layer_type"] == name and row["depth"] is not None
            )
            depths = [p[0] for p in points]
            ax.plot(depths, [p[1] for p in points], color=f"C{i}", marker=".", label=f"{label} (left)")
            ax.plot(depths, [p[2] for p in points], color=f"C{i}", linestyle="--", label=f"{label} (right)")
        ax.set_title(name)
        ax.set_ylim(0, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(types):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel("alignment (mean cos θ)")
    for ax in axes[-cols:]:
        ax.set_xlabel("depth")
    axes[0].legend(fontsize="small")
    fig.suptitle("Alignment of top singular subspaces, base vs tuned")
    fig.savefig(path, dpi=DPI)


def plot_overlap(result: dict, path) -> None:
    """Heatmap of Jaccard overlaps: one row per target matrix, one column per comparison."""
    comparisons = result["comparisons"]
    names = list(result["matrices"])
    values = [[row[c] for c in comparisons] for row in result["matrices"].values()]
    fig = Figure(figsize=(3.5 + 1.2 * len(comparisons), 1.5 + 0.22 * len(names)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(comparisons)), comparisons, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), [n.removesuffix(".weight") for n in names], fontsize="small")
    if len(names) <= 64:
        for r, row in enumerate(values):
            for c, v in enumerate(row):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize="x-small",
                        color="black" if v > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="Jaccard overlap")
    ax.set_title("Selection overlap at equal k")
    fig.savefig(path, dpi=DPI)


def _plain_labels_within_a_decade(ax) -> None:
    """Label a log axis that spans less than a decade with plain numbers, as 5.24x10^2 reads badly."""
    low, high = ax.get_ylim()
    if low > 0 and high / low < 10:
        plain = FuncFormatter(lambda value, _: f"{value:.4g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)


def _ordered_union(groups) -> list[str]:
    """Keys of several dicts, in order of first appearance."""
    return list(dict.fromkeys(key for group in groups for key in group))


def _value(x) -> float:
    return math.nan if x is None else x
