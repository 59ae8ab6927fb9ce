"""`liftft reproduce`'s results: results.json, results.md (the run beside the paper) and results.png."""

from __future__ import annotations

from pathlib import Path

from liftft.utils.atomic import atomic_write, write_json_atomic
from liftft.reproduce.protocol import load_protocol

LABELS = {"lift": "LIFT", "full": "Full FT", "lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "s2ft": "S2FT",
          "magnitude": "Magnitude", "random": "Random", "principal-smallest": "Principal-smallest"}
PAPER_TABLES = {"math": "Table 1", "commonsense": "Table 2"}
MISSING = "–"


def label(method: str) -> str:
    """A method's name as the paper writes it."""
    return LABELS.get(method, method)


def build_results(args, evaluations: dict[str, dict], trainable: dict[str, int]) -> dict:
    """results.json: per method its settings, trained count and accuracy (percent) per task and on average, and
    the authors' reports for the row's model (none when the row is a default)."""
    row = args.row_used
    methods = {}
    for method, evaluation in evaluations.items():
        tasks = {name: {"accuracy": 100 * summary["accuracy"], "count": summary["count"]}
                 for name, summary in evaluation["tasks"].items() if name in args.task_names}
        methods[method] = {
            "settings": args.method_settings(method),
            "trainable": trainable[method],
            "tasks": tasks,
            "average": _mean(t["accuracy"] for t in tasks.values()),
        }
    protocol = load_protocol()
    return {
        "table": row.table,
        "model": args.model,
        "row": {"name": row.name, "how": row.how},
        "tasks": list(args.task_names),
        "training": args.training(),
        "evaluation": args.evaluation(),
        "methods": methods,
        "reported": [{**report, "source": protocol["sources"][report["source"]]} for report in row.reported]
        if row.reports_this_model else [],
        "notes": protocol["notes"],
        "sources": protocol["sources"],
    }


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def write_outputs(out: Path, results: dict) -> None:
    """DIR/results.json, DIR/results.md and DIR/results.png, each written atomically."""
    write_json_atomic(out / "results.json", results)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(markdown(results), encoding="utf-8"))
    atomic_write(out / "results.png", lambda tmp: plot(results, tmp))


def _number(value) -> str:
    return MISSING if value is None else f"{value:.2f}"


def markdown(results: dict) -> str:
    """The run's accuracy per task and on average, one column per method, the paper's number beside it."""
    methods = results["methods"]
    paper = results["reported"][0] if results["reported"] else None
    lines = [f"# liftft reproduce: {results['table']} ({PAPER_TABLES[results['table']]} of the paper)", "",
             f"Model `{results['model']}`; hyperparameters of the paper's row **{results['row']['name']}** "
             f"({_row_reason(results['row']['how'])}). Accuracy in percent.", ""]
    header = ["task"]
    for method in methods:
        header += [f"{label(method)} (run)"] + ([f"{label(method)} (paper)"] if paper else [])
    lines += ["| " + " | ".join(header) + " |", "| --- " + "| ---: " * (len(header) - 1) + "|"]
    for task in results["tasks"]:
        cells = [task]
        for method, run in methods.items():
            ran = run["tasks"].get(task)
            cells.append(MISSING if ran is None else _number(ran["accuracy"]))
            if paper:
                cells.append(_number(paper.get("tasks", {}).get(method, {}).get(task)))
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**average**"]
    for method, run in methods.items():
        cells.append(f"**{_number(run['average'])}** ({len(run['tasks'])} tasks)")
        if paper:
            cells.append(_number(paper["average"].get(method)))
    lines += ["| " + " | ".join(cells) + " |", ""]
    if paper:
        lines += [f"Paper: {paper['source']}; {_seeds(paper['seeds'])}. The paper averages over every task of the "
                  f"table; the run's average is over the tasks it evaluated.", ""]
    lines += _reports_section(results) + _settings_section(results) + _notes_section(results)
    return "\n".join(lines)


def _row_reason(how: str) -> str:
    return {"matched": "matched by the model's name", "chosen": "chosen with --row",
            "default": "the default: the paper did not fine-tune this model, so no paper numbers are shown"}[how]


def _seeds(count: int) -> str:
    return "one seed" if count == 1 else f"mean of {count} seeds"


def _reports_section(results: dict) -> list[str]:
    """Every report of the authors for this model, per task where they gave them."""
    lines = []
    for report in results["reported"]:
        methods = list(report["average"])
        lines += [f"## Reported for {results['row']['name']}: {_seeds(report['seeds'])}", "", report["source"], "",
                  "| task | " + " | ".join(map(label, methods)) + " |", "| --- " + "| ---: " * len(methods) + "|"]
        for task in results["tasks"] if report.get("tasks") else []:
            values = [_number(report["tasks"].get(m, {}).get(task)) for m in methods]
            lines.append(f"| {task} | " + " | ".join(values) + " |")
        lines += ["| **average** | " + " | ".join(_number(report["average"][m]) for m in methods) + " |", ""]
    return lines


def _settings_section(results: dict) -> list[str]:
    training = ", ".join(f"{k} {v}" for k, v in results["training"].items() if v is not None)
    evaluation = ", ".join(f"{k} {v}" for k, v in results["evaluation"].items() if v is not None)
    lines = ["## Settings", "", f"- training: {training}", f"- evaluation: {evaluation}"]
    for method, run in results["methods"].items():
        settings = ", ".join(f"{k} {v}" for k, v in run["settings"].items())
        lines.append(f"- {label(method)}: {settings}; {run['trainable']:,} trained values")
    return lines + [""]


def _notes_section(results: dict) -> list[str]:
    sources = [f"- {name}: {text}" for name, text in results["sources"].items()]
    return ["## Where the paper and the authors' repo differ, and what liftft does", "",
            *(f"- {note}" for note in results["notes"]), "", "## Sources", "", *sources, ""]


def plot(results: dict, path) -> None:
    """Per task the run's accuracy of every method, and each method's average beside the paper's."""
    from matplotlib.figure import Figure

    methods = list(results["methods"])
    paper = results["reported"][0]["average"] if results["reported"] else {}
    tasks = results["tasks"]
    fig = Figure(figsize=(max(8.0, 1.1 * len(tasks) + 3), 4.2), layout="constrained")
    per_task, averages = fig.subplots(1, 2, width_ratios=(max(len(tasks), 1), max(len(methods), 2)))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [t + (i - (len(methods) - 1) / 2) * width for t in range(len(tasks))]
        values = [results["methods"][method]["tasks"].get(task, {}).get("accuracy", 0.0) for task in tasks]
        per_task.bar(xs, values, width, label=label(method), color=f"C{i}")
    per_task.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
    per_task.set(ylim=(0, 105), ylabel="accuracy (%)", title="This run, per task")
    per_task.legend(fontsize=8)
    x = range(len(methods))
    runs = [results["methods"][m]["average"] or 0.0 for m in methods]
    averages.bar([i - 0.2 for i in x], runs, 0.4, label="this run", color=[f"C{i}" for i in x])
    reported = [i for i, m in enumerate(methods) if m in paper]
    if reported:
        averages.bar([i + 0.2 for i in reported], [paper[methods[i]] for i in reported], 0.4, label="paper",
                     color="lightgray", hatch="//", edgecolor="gray")
    averages.set_xticks(list(x), [label(m) for m in methods], rotation=30, ha="right", fontsize=8)
    averages.set(ylim=(0, 105), title="Average: run vs paper" if paper else "Average (no paper numbers for this model)")
    averages.legend(fontsize=8)
    fig.suptitle(f"liftft reproduce {results['table']}: {results['model']} (row {results['row']['name']})")
    fig.savefig(path, dpi=110, format="png")
