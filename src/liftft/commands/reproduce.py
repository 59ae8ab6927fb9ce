"""`liftft reproduce`: one command per table of the paper, by the authors' protocol."""

from __future__ import annotations

import argparse

from liftft.commands import DefaultsShown, comma_list
from liftft.eval import EXTRACTORS


def register(subparsers) -> None:
    """Add the `reproduce` subcommand."""
    from liftft.reproduce.protocol import table_names
    from liftft.reproduce.run import DEFAULT_METHODS, DEFAULT_TEST_DIR

    p = subparsers.add_parser(
        "reproduce",
        formatter_class=DefaultsShown,
        help="rerun a table of the paper (math or commonsense) by the authors' protocol",
        description="Train each method by the authors' protocol (3 epochs, effective batch 16, max length 2048, "
        "linear schedule with 3% warmup, bf16 on a GPU, seed 43, the authors' hyperparameters for the model's row of "
        "the table), evaluate it (4 beams, 256 new tokens), and write DIR/results.md, DIR/results.json and "
        "DIR/results.png with the paper's numbers beside the run's. Rerunning continues: finished trainings and "
        "evaluated tasks are kept, an interrupted training resumes.",
    )
    p.add_argument("table", choices=table_names(), help="the paper's table: math (Table 1) or commonsense (Table 2)")
    p.add_argument("--model", required=True, help="base model: a hub id or a local directory; its name picks the "
                   "paper's row (Llama-2-7B, Llama-3-8B, Llama-3.2-1B, Llama-3.2-3B), else Llama-2-7B's settings")
    p.add_argument("--data", nargs="+", default=None,
                   help="training data, as `liftft train --data` reads it (default: LLM-Adapters/ft-training_set/"
                   "math_10k.json or commonsense_170k.json, from a clone of AGI-Edgerunners/LLM-Adapters)")
    p.add_argument("--output", required=True, help="output directory DIR")
    p.add_argument("--data-dir", default=DEFAULT_TEST_DIR,
                   help="folder holding <task>/test.json for every task (LLM-Adapters' dataset/)")
    p.add_argument("--methods", type=comma_list, default=list(DEFAULT_METHODS),
                   help="comma-separated methods of `liftft train --method` (default: lift,full,lora,dora,pissa,s2ft)")
    p.add_argument("--tasks", help="comma-separated task names, math or commonsense (default: the table's tasks)")
    p.add_argument("--row", help="use this row's hyperparameters and paper numbers, whatever --model is called")
    p.add_argument("--limit", type=int, help="evaluate only the first N records of each task (smoke runs)")
    p.add_argument("--max-steps", type=int, help="optimizer steps per method instead of 3 epochs (smoke runs)")
    p.add_argument("--batch-size", type=int,
                   help="examples per micro-batch (default: 1); alone, it divides the accumulation so that the "
                   "effective batch stays 16")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: 16)")
    p.add_argument("--max-seq-len", type=int, help="longest training example in tokens (default: 2048)")
    p.add_argument("--val-size", type=int, help="training records held out, as the authors' script does (default: 100)")
    p.add_argument("--seed", type=int, help="seed of every run (default: 43)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations to save memory (default: on, as the authors ran)")
    p.add_argument("--lr", type=float, help="peak learning rate of every method (default: the row's, per method)")
    p.add_argument("--rank", type=int, help="budget rank of every method (default: the row's, per method)")
    p.add_argument("--filter-rank", type=int, help="LIFT's SVD rank (default: the row's)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 training and evaluation (default: on with a CUDA GPU that supports it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--eval-batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--max-new-tokens", type=int, help="longest generated answer (default: 256)")
    p.add_argument("--num-beams", type=int, help="beam width of generation (default: 4)")
    p.add_argument("--extractor", choices=EXTRACTORS,
                   help="answer extraction (default: reference, the authors' rules; strict is recorded beside it)")
    p.set_defaults(func=run)


def run(args) -> int:
    from liftft.reproduce import ReproduceArgs, reproduce

    reproduce(ReproduceArgs(
        table=args.table, model=args.model, output=args.output, data=args.data, data_dir=args.data_dir,
        methods=args.methods, tasks=args.tasks, row=args.row, limit=args.limit, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_seq_len=args.max_seq_len, val_size=args.val_size,
        seed=args.seed, gradient_checkpointing=args.gradient_checkpointing, lr=args.lr, rank=args.rank,
        filter_rank=args.filter_rank, bf16=args.bf16, device=args.device, eval_batch_size=args.eval_batch_size,
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, extractor=args.extractor,
        progress=args.progress,
    ))
    return 0
