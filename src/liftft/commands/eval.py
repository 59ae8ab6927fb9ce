"""`liftft eval`: accuracy on the LLM-Adapters arithmetic and commonsense benchmarks."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from liftft.eval import (
    EXTRACTORS,
    KINDS,
    SCORINGS,
    check_answers,
    check_candidates,
    completed_tasks,
    custom_task,
    evaluate_task,
    format_table,
    read_records,
    resolve_tasks,
    save_task,
    write_results,
)
from liftft.eval.results import check_output, results_with_settings
from liftft.eval.scoring import encode_prompts, generates
from liftft.eval.tasks import TEST_FILE, find_test_file
from liftft.data.template import TEMPLATES


def register(subparsers) -> None:
    """Add the `eval` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on the arithmetic and commonsense benchmarks",
        description=(
            "Evaluate a model (optionally with a liftft delta or a PEFT adapter) on the LLM-Adapters test sets. "
            "Writes OUTPUT/results.json and OUTPUT/predictions/<task>.jsonl; tasks already done with the same "
            "settings are skipped."
        ),
    )
    parser.add_argument("--model", required=True, help="base model: a local directory or a hub id")
    parser.add_argument("--tokenizer", help="tokenizer directory or hub id (default: --model)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--delta", help="liftft delta directory to apply to the base model")
    source.add_argument("--adapter", help="PEFT adapter directory to load on the base model")
    parser.add_argument(
        "--output",
        required=True,
        help="directory for results.json and predictions/; checked to be writable before the model loads",
    )
    parser.add_argument(
        "--tasks",
        help="math, commonsense, all, or comma-separated task names, any case (default: all, or none with --task-file)",
    )
    parser.add_argument("--data-dir", help=f"folder holding <task>/{TEST_FILE} for every task (LLM-Adapters dataset/)")
    parser.add_argument("--task-file", help="a test file outside the known tasks, in the same record format")
    parser.add_argument("--kind", choices=KINDS, help="answer kind of --task-file")
    parser.add_argument(
        "--task-name", help="name of --task-file in the results (default: its folder name for test.json, else its stem)"
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N records of each task")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts (loglik: candidate sequences) per batch")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="longest generated response, in tokens; capped, with a warning, where a task's longest prompt plus "
        "this would exceed the model's max_position_embeddings",
    )
    parser.add_argument("--num-beams", type=int, default=1, help="beam width; 1 is greedy, 4 is the authors' setting")
    parser.add_argument(
        "--extractor",
        choices=EXTRACTORS,
        default="strict",
        help="answer extraction: the authors' exact rules, or stricter ones (both are recorded)",
    )
    parser.add_argument(
        "--scoring",
        choices=SCORINGS,
        default="generate",
        help="generate and extract, or rank the choices by log-likelihood (multiple-choice tasks only; "
        "numeric tasks are still generated). loglik reads a letter task's options from its instruction in any common "
        "layout: (A) x, [A] x, A) x, A. x or A: x, lower case too, separated by spaces, commas, semicolons or "
        "newlines; the list that ends last counts, and a record whose options are ambiguous is refused by its index",
    )
    parser.add_argument("--template", choices=TEMPLATES, default="alpaca", help="prompt template used in training")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the model in bfloat16 (default: on with a CUDA device, off on CPU)",
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="rerun tasks already done in --output")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Evaluate every requested task and print the results table.

    Every input and output path is checked before the model's weights load.
    """
    from liftft.utils.hf import load_config, load_tokenizer

    _check_flags(args)
    config = load_config(args.model)
    jobs, missing = _collect_tasks(args)
    settings = _settings(args)
    done = completed_tasks(args.output, settings, args.overwrite)
    for task, _ in jobs:
        if task.name in done:
            print(f"{task.name}: already done in {args.output}, skipped (--overwrite reruns it)")
    for name in missing:
        print(f"{name}: missing, no {Path(args.data_dir) / name / TEST_FILE}")
    pending = [(task, records) for task, records in jobs if task.name not in done]
    check_output(args.output, [task.name for task, _ in pending])
    if pending:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        new_tokens = _new_token_limits(args, tokenizer, pending, config)
        model = _load_model(args, settings["dtype"])
        for task, records in pending:
            summary, predictions = evaluate_task(
                model,
                tokenizer,
                task,
                records,
                scoring=args.scoring,
                extractor=args.extractor,
                template=args.template,
                batch_size=args.batch_size,
                max_new_tokens=new_tokens[task.name],
                num_beams=args.num_beams,
            )
            save_task(args.output, settings, task, summary, predictions)
    results = write_results(args.output, results_with_settings(args.output, settings), missing)
    print(format_table(results))
    return 0


def _check_flags(args) -> None:
    """Reject flag values and combinations that cannot work, before any loading."""
    sizes = {
        "--batch-size": args.batch_size,
        "--max-new-tokens": args.max_new_tokens,
        "--num-beams": args.num_beams,
        "--limit": args.limit,
    }
    for flag, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if (args.task_file is None) != (args.kind is None):
        raise ValueError("--task-file and --kind go together: give both or neither")
    if args.task_name is not None and args.task_file is None:
        raise ValueError("--task-name names a --task-file; give --task-file too")
    if args.delta is not None and not os.path.isdir(args.delta):
        raise FileNotFoundError(f"--delta directory {args.delta!r} does not exist")
    if args.adapter is not None and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise FileNotFoundError(f"--adapter {args.adapter!r} is not a PEFT adapter directory (no adapter_config.json)")


def _collect_tasks(args):
    """The (task, records) pairs to evaluate, every file validated, and the names of missing tasks."""
    tasks = []
    if args.tasks is not None or args.task_file is None:
        if args.data_dir is None:
            raise ValueError(f"--tasks needs --data-dir, the folder that holds <task>/{TEST_FILE}")
        if not os.path.isdir(args.data_dir):
            raise FileNotFoundError(f"--data-dir {args.data_dir!r} does not exist")
        tasks = resolve_tasks(args.tasks or "all")
    jobs, missing = [], []
    for task in tasks:
        path = find_test_file(args.data_dir, task.name)
        if path is None:
            missing.append(task.name)
            continue
        jobs.append((task, _checked_records(task, path, args)))
    if args.task_file is not None:
        records = read_records(args.task_file)
        task = custom_task(_custom_name(args, [t.name for t in tasks]), args.kind, records)
        jobs.append((task, _checked_records(task, args.task_file, args, records)))
    return jobs, missing


def _checked_records(task, path, args, records=None) -> list[dict]:
    """A task file's records, answers (and choices, for loglik) checked, cut to --limit."""
    records = records if records is not None else read_records(path)
    check_answers(task, records, path)
    if not generates(task, args.scoring):
        check_candidates(task, records, path)
    return records[: args.limit]


def _custom_name(args, taken: list[str]) -> str:
    """The results name of --task-file: --task-name, else its folder (for test.json) or stem."""
    path = Path(args.task_file)
    name = args.task_name or (path.parent.resolve().name if path.stem == "test" else path.stem)
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"--task-name {name!r} must be letters, digits, '_', '-' or '.'")
    if name.lower() in (t.lower() for t in taken):
        raise ValueError(f"--task-file is named {name!r} like a task in --tasks; pick another with --task-name")
    return name


def _settings(args) -> dict:
    """Everything that changes a task's result; a rerun skips only tasks done with the same settings."""
    bf16 = args.bf16 if args.bf16 is not None else _device(args).startswith("cuda")
    return {
        "model": args.model,
        "tokenizer": args.tokenizer or args.model,
        "delta": args.delta,
        "adapter": args.adapter,
        "template": args.template,
        "scoring": args.scoring,
        "extractor": args.extractor,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "limit": args.limit,
        "dtype": "bfloat16" if bf16 else "float32",
    }


def _device(args) -> str:
    """--device, else cuda when available, else cpu."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _new_token_limits(args, tokenizer, jobs, config) -> dict[str, int]:
    """--max-new-tokens for each task, capped so that its longest prompt and the response fit the model's positions.

    Beyond them a model generates slowly and badly (one record took 743 s), or fails.
    """
    positions = getattr(config, "max_position_embeddings", None)
    limits = {}
    for task, records in jobs:
        limits[task.name] = args.max_new_tokens
        if positions is None or not generates(task, args.scoring):
            continue
        longest = max((len(ids) for ids in encode_prompts(tokenizer, records, args.template)), default=0)
        cap = max(positions - longest, 1)
        if args.max_new_tokens > cap:
            limits[task.name] = cap
            print(
                f"liftft eval: warning: --max-new-tokens {args.max_new_tokens} capped at {cap} for {task.name}: "
                f"the model has {positions} positions and the longest prompt takes {longest}",
                file=sys.stderr,
            )
    return limits


def _load_model(args, dtype_name: str):
    """The model to evaluate, in eval mode, with its delta or adapter applied (a QLIFT delta on its base loaded in 4 bits,
    in the dtype it trained in)."""
    import torch

    from liftft.deltas.delta import apply_delta, load_delta
    from liftft.utils.hf import load_model

    delta = None if args.delta is None else load_delta(args.delta)  # a damaged delta is named before the model loads
    if delta is not None and "quantization" in delta.meta:  # a QLIFT delta: its 4-bit base, loaded as it trained
        from liftft.deltas.merge import load_trained_4bit

        return load_trained_4bit(args.model, delta, args.delta, _device(args)).eval()
    model = load_model(args.model, getattr(torch, dtype_name), _device(args))
    if delta is not None:
        apply_delta(model, delta)
    if args.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    return model.eval()
