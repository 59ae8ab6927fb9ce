"""`liftft analyze perturb|spectrum|overlap|filter-rank`: the paper's analyses as JSON results and PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from liftft.commands import (add_progress_flag, comma_list, density_arg, non_negative_int, numbers_arg, positive_int,
                             positive_ints, target_modules_arg)
from liftft.engine.config import SELECTORS, SVD_METHODS, TARGET_PRESETS, LiftConfig
from liftft.eval.tasks import KINDS
from liftft.data.template import TEMPLATES

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_OVERLAP_FILTER_RANKS = "64,32,128"


def register(subparsers) -> None:
    """Add `analyze` and its three analyses to the `liftft` command."""
    parser = subparsers.add_parser(
        "analyze",
        help="perturbation, spectral, selection-overlap and filter-rank analyses, with plots",
        description="Analyses that show why Principal Weights matter. Each writes JSON and PNG files to --output.",
    )
    analyses = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    _register_perturb(analyses)
    _register_spectrum(analyses)
    _register_overlap(analyses)
    _register_filter_rank(analyses)
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run the chosen analysis; returns the exit code."""
    # filter-rank resolves its own budget: --model demo has the demo's.
    if hasattr(args, "density") and args.rank is None and args.density is None and args.analysis != "filter-rank":
        args.rank = LiftConfig.rank  # recorded in the JSON settings as the budget actually used
    return {"perturb": run_perturb, "spectrum": run_spectrum, "overlap": run_overlap,
            "filter-rank": run_filter_rank}[args.analysis](args)


# ---------------------------------------------------------------- perturb


def _register_perturb(analyses) -> None:
    p = analyses.add_parser(
        "perturb",
        help="perplexity when each selector's entries are perturbed (paper Fig. 2)",
        description="Perturb the k entries per target matrix that each selector would train (same k for all) "
        "and measure perplexity on --data. Writes perturb.json and perturb.png to --output.",
    )
    p.add_argument("--model", required=True, help="base model: hub id or local directory")
    p.add_argument("--tokenizer", help="tokenizer hub id or directory (default: --model)")
    p.add_argument("--delta", help="liftft delta directory (with liftft.json) or PEFT adapter directory to apply first")
    p.add_argument("--data", required=True, nargs="+", help="data file(s) of LLM-Adapters records (JSON / JSON Lines)")
    p.add_argument("--output", required=True, help="directory for perturb.json and perturb.png")
    p.add_argument("--selectors", type=comma_list, default="principal,magnitude,random",
                   help=f"comma-separated selectors to compare, from: {', '.join(SELECTORS)} (default: %(default)s)")
    _add_budget_options(p)
    p.add_argument("--filter-rank", type=positive_int, default=64, help="rank of the SVD approximation for principal selectors (default: 64)")
    p.add_argument("--svd", choices=SVD_METHODS, default="exact", help="SVD used by principal selectors (default: exact)")
    p.add_argument("--mode", default="relative",
                   help="relative: W·(1+s·z); absolute: W + s·std(W)·z; zero: set to 0, no noise scales (default: relative)")
    p.add_argument("--noise", type=numbers_arg, default=None,
                   help="comma-separated noise scales s >= 0 (default: 0,0.5,1,2,4; not allowed with --mode zero)")
    p.add_argument("--limit", type=positive_int, help="use only the first N records")
    p.add_argument("--seq-len", type=positive_int, default=256, help="tokens per row of the packed data (default: 256)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass (default: 8)")
    p.add_argument("--template", choices=TEMPLATES, default="alpaca", help="prompt template (default: alpaca)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the noise z and of the random selector (default: 0)")
    _add_model_options(p)


def run_perturb(args) -> int:
    """`liftft analyze perturb`."""
    from liftft.analysis.perturbation import DEFAULT_NOISE, check_perturb_options, pack_records, perplexity, perturb
    from liftft.analysis.plots import plot_perturbation
    from liftft.data.batches import load_records
    from liftft.utils.hf import load_tokenizer

    if args.mode == "zero" and args.noise is not None:
        raise ValueError("--noise does not apply to --mode zero, which sets the entries to 0")
    noise = DEFAULT_NOISE if args.noise is None else args.noise
    selectors, _ = check_perturb_options(args.selectors, args.mode, noise)
    if args.delta is not None and _adapter_kind(args.delta) is None:
        raise FileNotFoundError(f"--delta {args.delta!r} is not a directory holding liftft.json or adapter_config.json")
    records = load_records(args.data)[: args.limit]
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    input_ids = pack_records(records, tokenizer, seq_len=args.seq_len, template=args.template)

    model = _load_model(args.model, args.dtype, _device(args.device), adapter=args.delta)
    unperturbed = perplexity(model, input_ids, args.batch_size)
    results = perturb(
        model, input_ids, selectors=selectors, rank=args.rank, density=args.density, filter_rank=args.filter_rank,
        mode=args.mode, noise=noise, seed=args.seed, svd=args.svd, target_modules=args.target_modules,
        batch_size=args.batch_size, progress=args.progress,
    )
    output = _output_dir(args.output)
    settings = {key: getattr(args, key) for key in (
        "model", "delta", "data", "rank", "density", "filter_rank", "svd", "mode", "seed", "target_modules",
        "seq_len", "dtype", "template")}
    settings.update(records=len(records), tokens=input_ids.numel(), rows=input_ids.shape[0])
    _write_json(output / "perturb.json", {"settings": settings, "unperturbed_perplexity": unperturbed, "results": results})
    plot_perturbation(results, output / "perturb.png", mode=args.mode, unperturbed=unperturbed)

    scales = [point["noise"] for point in next(iter(results.values()))]
    header = ["selector"] + ["zeroed" if s is None else f"s={s:g}" for s in scales]
    rows = [[name] + [f"{point['perplexity']:.4g}" for point in points] for name, points in results.items()]
    print(f"unperturbed perplexity {unperturbed:.4g} ({input_ids.shape[0]}x{input_ids.shape[1]} tokens, mode {args.mode})")
    _print_table(header, rows)
    print(f"wrote {output / 'perturb.json'} and {output / 'perturb.png'}")
    return 0


# --------------------------------------------------------------- spectrum


def _register_spectrum(analyses) -> None:
    p = analyses.add_parser(
        "spectrum",
        help="norm, rank and singular-subspace alignment of fine-tune updates (paper Figs. 5, 13)",
        description="Compare each target matrix of one or more fine-tunes with the base: ‖ΔW‖, effective and "
        "stable rank of ΔW, alignment of top singular subspaces. Writes spectrum.json, spectrum_rank.png "
        "and spectrum_alignment.png to --output.",
    )
    p.add_argument("--model", "--base", dest="base", required=True, help="base model: hub id or local directory")
    p.add_argument("--tuned", required=True, nargs="+",
                   help="one or more fine-tunes of --base: merged model, liftft delta directory or PEFT adapter directory")
    p.add_argument("--labels", type=comma_list, help="comma-separated labels for the --tuned runs (default: their directory names)")
    p.add_argument("--output", required=True, help="directory for spectrum.json and the plots")
    p.add_argument("--top", type=positive_int, default=64, help="dimension of the singular subspaces compared (default: 64)")
    _add_model_options(p, device_help="device for the SVDs; models stay on the CPU")


def run_spectrum(args) -> int:
    """`liftft analyze spectrum`."""
    from liftft.analysis.plots import plot_alignment, plot_update_rank
    from liftft.analysis.spectral import spectrum
    from liftft.utils.hf import check_model_path

    labels = _run_labels(args.tuned, args.labels)
    for path in [args.base, *args.tuned]:
        check_model_path(path)
    device = _device(args.device)
    base = _load_model(args.base, args.dtype, "cpu")
    runs = {}
    for label, path in zip(labels, args.tuned):
        tuned = _load_model(args.base, args.dtype, "cpu", adapter=path) if _adapter_kind(path) else _load_model(path, args.dtype, "cpu")
        try:
            runs[label] = spectrum(base, tuned, top=args.top, target_modules=args.target_modules, device=device, progress=args.progress)
        except ValueError as err:
            raise ValueError(f"--tuned {path}: {err}") from err
        del tuned
    output = _output_dir(args.output)
    settings = {"base": args.base, "tuned": dict(zip(labels, args.tuned)), "top": args.top,
                "target_modules": args.target_modules, "dtype": args.dtype}
    _write_json(output / "spectrum.json", {"settings": settings, "runs": runs})
    plot_update_rank(runs, output / "spectrum_rank.png")
    plot_alignment(runs, output / "spectrum_alignment.png")

    header = ["run", "layer type", "‖ΔW‖/‖W‖", "eff. rank", "stable rank", "align left", "align right"]
    metrics = ("relative_delta_norm", "effective_rank", "stable_rank", "left_alignment", "right_alignment")
    rows = [[label, kind] + [_fmt(means[m]) for m in metrics]
            for label, run in runs.items() for kind, means in run["by_type"].items()]
    _print_table(header, rows)
    print(f"wrote {output / 'spectrum.json'}, {output / 'spectrum_rank.png'} and {output / 'spectrum_alignment.png'}")
    return 0


# ---------------------------------------------------------------- overlap


def _register_overlap(analyses) -> None:
    p = analyses.add_parser(
        "overlap",
        help="Jaccard overlap of principal selection with magnitude, random, randomized SVD and other filter ranks",
        description="For each target matrix, the Jaccard overlap of equal-k selections. Prints a table by layer "
        "type and writes overlap.json and the heatmap overlap.png to --output.",
    )
    p.add_argument("--model", required=True, help="model: hub id or local directory")
    p.add_argument("--output", required=True, help="directory for overlap.json and overlap.png")
    _add_budget_options(p)
    p.add_argument("--filter-rank", type=positive_ints, default=DEFAULT_OVERLAP_FILTER_RANKS,
                   help="comma-separated filter ranks; the first is used for the other comparisons (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random selector and randomized SVD (default: 0)")
    _add_model_options(p)


def run_overlap(args) -> int:
    """`liftft analyze overlap`."""
    from liftft.analysis.plots import plot_overlap
    from liftft.analysis.selection_overlap import overlap

    model = _load_model(args.model, args.dtype, _device(args.device))
    result = overlap(model, rank=args.rank, density=args.density, filter_ranks=args.filter_rank, seed=args.seed,
                     target_modules=args.target_modules, progress=args.progress)
    output = _output_dir(args.output)
    settings = {key: getattr(args, key) for key in ("model", "rank", "density", "filter_rank", "seed", "target_modules", "dtype")}
    _write_json(output / "overlap.json", {"settings": settings, **result})
    plot_overlap(result, output / "overlap.png")

    groups = {**result["by_type"], "all": result["mean"]}
    header = ["layer type", "matrices"] + result["comparisons"]
    _print_table(header, [[kind, str(means["count"])] + [_fmt(means[c]) for c in result["comparisons"]]
                          for kind, means in groups.items()])
    print(f"wrote {output / 'overlap.json'} and {output / 'overlap.png'}")
    return 0


# ------------------------------------------------------------ filter-rank


def _register_filter_rank(analyses) -> None:
    p = analyses.add_parser(
        "filter-rank",
        help="target and source accuracy of LIFT fine-tunes at one budget k, by filter rank (paper's ablation)",
        description="Fine-tune with LIFT at one budget for each filter rank (runs under DIR/runs), score each on "
        "the target test records and the source ones, and write filter_rank.json and filter_rank.png to --output. "
        "Run again, it keeps the finished runs and their scores (scoring them again from their deltas if --test, "
        "--source, --kind, --limit or --max-new-tokens changed) and resumes an interrupted run from its last "
        "checkpoint; a run dir of other training settings is refused.",
    )
    p.add_argument("--model", required=True,
                   help="base model: hub id or local directory; 'demo' takes the demo's cached base (pretrained "
                   "once) with its target problems and source facts, and the demo's training settings as defaults")
    p.add_argument("--data", nargs="+", help="training data, as for `liftft train` (demo: its target problems)")
    p.add_argument("--test", help="target test records {instruction, input, answer}, scored by generation")
    p.add_argument("--source", help="source-domain test records, to measure what each run keeps (optional)")
    p.add_argument("--kind", choices=KINDS, default="number", help="answer kind of --test and --source (default: number)")
    p.add_argument("--output", required=True, help="directory for filter_rank.json, filter_rank.png and runs/")
    p.add_argument("--ranks", type=positive_ints,
                   help="comma-separated filter ranks (default: powers of two up to the largest min(m, n) of the "
                   "targets; larger ones are clamped to it, where W_r = W)")
    _add_budget_options(p)
    p.add_argument("--max-steps", type=positive_int, help="optimizer steps per run (default: 100; demo: its own)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4; demo: its LIFT rate)")
    p.add_argument("--batch-size", type=positive_int, help="examples per step (default: 8; demo: its own)")
    p.add_argument("--max-seq-len", type=positive_int, help="as for `liftft train` (default: 512; demo: 256)")
    p.add_argument("--svd", choices=SVD_METHODS, default="exact", help="SVD used for selection (default: exact)")
    p.add_argument("--limit", type=positive_int, help="score only the first N records of --test and --source")
    p.add_argument("--max-new-tokens", type=positive_int, help="generation length (default: 64; demo: 96)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--quick", action="store_true", help="--model demo: the quick demo's smaller base")
    p.add_argument("--target-modules", type=target_modules_arg, default="all-linear",
                   help="as for `liftft train` (default: all-linear)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    add_progress_flag(p)


def run_filter_rank(args) -> int:
    """`liftft analyze filter-rank`."""
    from liftft.analysis.filter_rank import PLOT_FILE, RESULT_FILE, FilterRankSettings, filter_rank_sweep

    names = ("model", "output", "data", "test", "source", "kind", "ranks", "rank", "density", "lr", "max_steps",
             "batch_size", "max_seq_len", "svd", "target_modules", "limit", "max_new_tokens", "seed", "quick",
             "device", "progress")
    result = filter_rank_sweep(FilterRankSettings(**{name: getattr(args, name) for name in names}))
    header = ["filter rank", "target acc", "source acc", "train loss"]
    _print_table(header, [["base", _fmt(result["base"].get("target_acc")), _fmt(result["base"].get("source_acc")), "-"]]
                 + [[str(r["filter_rank"]), _fmt(r.get("target_acc")), _fmt(r.get("source_acc")), _fmt(r["train_loss"])]
                    for r in result["runs"]])
    print(f"wrote {Path(args.output) / RESULT_FILE} and {Path(args.output) / PLOT_FILE}")
    return 0


# ----------------------------------------------------------------- shared


def _add_budget_options(p) -> None:
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--rank", type=positive_int, help=f"LoRA-parity budget: k = min((m+n)·rank, m·n) per matrix (default: {LiftConfig.rank})")
    budget.add_argument("--density", type=density_arg, help="budget as a fraction of each matrix's entries, in (0, 1]")


def _add_model_options(p, device_help: str = "device to run on") -> None:
    p.add_argument("--target-modules", type=target_modules_arg, default="all-linear",
                   help=f"{', '.join(TARGET_PRESETS)}, a comma-separated list of module-name suffixes, or a regex "
                   "(as for `liftft train`; default: all-linear)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the model(s) in (default: float32)")
    p.add_argument("--device", default="auto", help=f"{device_help}: cpu, cuda, cuda:N, or auto (cuda when available)")
    add_progress_flag(p)


def _adapter_kind(path: str) -> str | None:
    """'delta' for a liftft delta directory, 'peft' for a PEFT adapter directory, else None."""
    directory = Path(path).expanduser()
    if (directory / "liftft.json").is_file():
        return "delta"
    if (directory / "adapter_config.json").is_file():
        return "peft"
    return None


def _load_model(path: str, dtype: str, device, adapter: str | None = None):
    """The model at ``path``, with a liftft delta or PEFT adapter merged in when ``adapter`` is given."""
    import torch

    from liftft.utils.hf import load_model

    model = load_model(path, getattr(torch, dtype), device)
    kind = None if adapter is None else _adapter_kind(adapter)
    if kind == "delta":
        from liftft.deltas.delta import apply_delta

        apply_delta(model, adapter)
    elif kind == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, os.path.expanduser(adapter)).merge_and_unload()
    return model


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_labels(paths: list[str], labels: list[str] | None) -> list[str]:
    if labels is None:
        labels = [os.path.basename(os.path.normpath(p)) or p for p in paths]
        if len(set(labels)) != len(labels):
            raise ValueError(f"--tuned directories share a name ({', '.join(labels)}); give --labels")
    elif len(labels) != len(paths):
        raise ValueError(f"--labels has {len(labels)} names for {len(paths)} --tuned runs")
    elif len(set(labels)) != len(labels):
        raise ValueError(f"--labels repeats a name: {', '.join(labels)}")
    return labels


def _output_dir(path: str) -> Path:
    directory = Path(path).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _write_json(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for line in [header, [("-" * w) for w in widths], *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip())


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}"
