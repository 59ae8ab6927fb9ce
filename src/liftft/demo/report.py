"""The demo's printed table and its picture: retention at equal learning first."""

from __future__ import annotations

from pathlib import Path

LABELS = {"lift": "LIFT", "full": "Full FT", "lora": "LoRA", "magnitude": "Magnitude", "random": "Random",
          "principal-smallest": "Principal-smallest"}
# The methods a plain `liftft demo` runs; principal-smallest (the authors' released selection) on request.
DEMO_METHODS = ("lift", "full", "lora", "magnitude", "random")


def table(results: dict) -> str:
    """A plain-text table of every method against the base: source accuracy at each matched target level (the
    headline), then the best target accuracy reached and what was kept there, trainable values, time and memory."""
    matched = results["matched"]
    levels = [f"{level:g}" for level in matched["levels"]]
    base = results["base"]
    rows = [(*(f"kept @ ≥{level}" for level in levels), "best target", "kept there", "trainable", "train s", "peak MB")]
    rows.append((*("-" for _ in levels), f"{base['target_acc']:.3f}", f"{base['source_acc']:.3f}", "-", "-", "-"))
    for method, r in results["methods"].items():
        kept = matched["source_acc"][method]
        rows.append((*(f"{kept[level]:.3f}" for level in levels), f"{r['best_target_acc']:.3f}",
                     f"{r['source_acc_at_best_target']:.3f}", f"{r['trainable']:,}", f"{r['train_seconds']:.1f}",
                     f"{r['peak_mem_mb']:.0f}"))
    names = ["model", "base", *(LABELS.get(m, m) for m in results["methods"])]
    rows = [(name, *row) for name, row in zip(names, rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    title = "liftft demo" + (" (--quick: a smoke run at reduced size; its numbers are not the demo's result)"
                             if results["settings"].get("quick") else "")
    return "\n".join([title, _explain(matched), *lines])


def _explain(matched: dict) -> str:
    """The line above the table: what "kept @ ≥L" means, and the levels left out."""
    if not matched["levels"]:
        text = "no target accuracy level was reached by every method, so there is no retention at equal learning"
    else:
        text = ("retention at equal learning: \"kept @ ≥L\" is the best source accuracy of a method's runs "
                "(learning rates x steps) at target accuracy L or more")
    if matched["dropped"]:
        text += f"; levels {', '.join(f'{level:g}' for level in matched['dropped'])} left out: not every method reached them"
    return text


def plot(results: dict, path: Path) -> None:
    """demo.png: each method's frontier of target accuracy (learned) against source accuracy (kept), and the
    source accuracy at the matched target levels."""
    from matplotlib.figure import Figure

    base = results["base"]
    methods = list(results["methods"])
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    frontiers, bars = fig.subplots(1, 2, width_ratios=(1.15, 1))
    for method in methods:
        r = results["methods"][method]
        label = LABELS.get(method, method)
        # Every run's points faintly; the frontier as a staircase: at each target accuracy x, the most kept at >= x.
        line = frontiers.step([p["target_acc"] for p in r["frontier"]], [p["source_acc"] for p in r["frontier"]],
                              where="pre", marker="o", markersize=4, linewidth=1.6, label=label)[0]
        frontiers.scatter([p["target_acc"] for p in r["points"]], [p["source_acc"] for p in r["points"]], s=12,
                          alpha=0.25, color=line.get_color())
    frontiers.scatter(base["target_acc"], base["source_acc"], s=90, marker="s", color="gray", zorder=3, label="base")
    frontiers.legend(fontsize=8, loc="upper right")
    frontiers.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="target accuracy (learned)",
                  ylabel="source accuracy (kept)", title="Frontiers over lr x step: up and right is better")
    frontiers.grid(alpha=0.3)
    _matched_bars(bars, results, methods)
    if results["settings"].get("quick"):
        fig.suptitle("--quick smoke run: reduced size, numbers are indicative only", color="firebrick")
    fig.savefig(path, dpi=110)


def _matched_bars(ax, results: dict, methods: list[str]) -> None:
    """Source accuracy per method, grouped by the matched target levels."""
    matched = results["matched"]
    levels = matched["levels"]
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        kept = [matched["source_acc"][method][f"{level:g}"] for level in levels]
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(levels))], kept, width,
               label=LABELS.get(method, method))
    ax.set_xticks(list(range(len(levels))), [f"target ≥ {level:g}" for level in levels], fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="source accuracy (kept)", title="Kept at equal learning")
    if levels:
        ax.legend(fontsize=8, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no target level reached by every method", ha="center", va="center", transform=ax.transAxes)
