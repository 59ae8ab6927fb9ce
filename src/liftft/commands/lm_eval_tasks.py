"""`liftft lm-eval-tasks`: the benchmarks as an lm-eval-harness task pack; prints the directory for --include_path."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the `lm-eval-tasks` subcommand."""
    parser = subparsers.add_parser(
        "lm-eval-tasks",
        help="write an lm-eval-harness task pack for the benchmarks and print its directory",
        description=(
            "Write lm-eval-harness YAML tasks for the LLM-Adapters benchmarks found in --data-dir (liftft_gsm8k, "
            "liftft_boolq, ...) and the groups liftft_math and liftft_commonsense (unweighted means), with liftft's "
            "prompt template and answer extraction, scored by both extractors (filters 'strict' and 'reference'), "
            "so that a merged model scores in lm-eval what `liftft eval` scores. Prints only the directory, for "
            "`lm_eval --include_path $(liftft lm-eval-tasks --data-dir DIR) --tasks liftft_math`. "
            "Reading the tasks needs `pip install \"liftft[lm-eval]\"`; writing them does not."
        ),
    )
    parser.add_argument(
        "--data-dir",
        help="folder holding <task>/test.json for the tasks (LLM-Adapters dataset/); written into the pack as an "
        "absolute path (default: $LIFTFT_DATA_DIR)",
    )
    parser.add_argument(
        "--output",
        help="directory for the pack, replaced if it is an earlier pack (default: one per data dir under liftft's "
        "cache: $LIFTFT_CACHE, else $XDG_CACHE_HOME/liftft, else ~/.cache/liftft)",
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    """Write the pack and print its directory, and nothing else, on stdout."""
    from liftft.lm_eval_tasks import write_task_pack

    print(write_task_pack(args.data_dir, args.output))
    return 0
