"""The demo's printed table and its picture."""

from __future__ import annotations

from pathlib import Path

LABELS = {"lift": "LIFT", "full": "Full FT", "lora": "LoRA", "magnitude": "Magnitude", "random": "Random"}
DEMO_METHODS = tuple(LABELS)


def table(results: dict) -> str:
    """A plain-text table of every method against the base."""
    base = results["base"]
    rows = [("model", "target acc", "source acc", "trainable", "train s", "peak MB"),
            ("base", f"{base['target_acc']:.3f}", f"{base['source_acc']:.3f}", "-", "-", "-")]
    for method, r in results["methods"].items():
        rows.append((LABELS.get(method, method), f"{r['target_acc']:.3f}", f"{r['source_acc']:.3f}",
                     f"{r['trainable']:,}", f"{r['train_seconds']:.1f}", f"{r['peak_mem_mb']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    title = "liftft demo" + (" (--quick: a smoke run at reduced size; its numbers are not the demo's result)"
                             if results["settings"].get("quick") else "")
    return "\n".join([title, *lines])


def plot(results: dict, path: Path) -> None:
    """demo.png: what each method learned (target accuracy) against what it kept (source accuracy)."""
    from matplotlib.figure import Figure

    base = results["base"]
    methods = list(results["methods"])
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    learn_keep, bars = fig.subplots(1, 2, width_ratios=(1.15, 1))
    for method in methods:
        r = results["methods"][method]
        # A legend, not labels at the points: methods often land on top of each other.
        learn_keep.scatter(r["target_acc"], r["source_acc"], s=90, zorder=3, alpha=0.8, label=LABELS.get(method, method))
    learn_keep.scatter(base["target_acc"], base["source_acc"], s=90, marker="s", color="gray", zorder=3, label="base")
    learn_keep.legend(fontsize=8, loc="center right")
    learn_keep.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="target accuracy (learned)",
                   ylabel="source accuracy (retained)", title="Learning vs forgetting: up and right is better")
    learn_keep.grid(alpha=0.3)

    x = range(len(methods))
    width = 0.38
    target = [results["methods"][m]["target_acc"] for m in methods]
    source = [results["methods"][m]["source_acc"] for m in methods]
    bars.bar([i - width / 2 for i in x], target, width, label="target")
    bars.bar([i + width / 2 for i in x], source, width, label="source")
    bars.axhline(base["source_acc"], color="gray", linestyle="--", linewidth=1, label="base source")
    labels = [f"{LABELS.get(m, m)}\n{results['methods'][m]['trainable']:,}" for m in methods]
    bars.set_xticks(list(x), labels, fontsize=8)
    bars.set(ylim=(0, 1.18), ylabel="accuracy", title="Accuracy per method (trainable values below)")
    bars.legend(fontsize=8, loc="upper center", ncol=3)
    if results["settings"].get("quick"):
        fig.suptitle("--quick smoke run: reduced size, numbers are indicative only", color="firebrick")
    fig.savefig(path, dpi=110)
