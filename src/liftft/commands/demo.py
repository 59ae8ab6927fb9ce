"""`liftft demo`: the LIFT story on a CPU in minutes, with no downloads."""

from __future__ import annotations

from liftft.commands import add_progress_flag


def register(subparsers) -> None:
    from liftft.demo import DEMO_METHODS, LABELS

    p = subparsers.add_parser(
        "demo",
        help="pretrain a small model offline, fine-tune it with LIFT and baselines, compare learning and forgetting",
        description="Builds (once, then cached) a small Llama pretrained on a generated world of facts, fine-tunes it "
        "on generated arithmetic word problems with each method at the same budget over a small grid of learning "
        "rates, scores every run at several steps for target accuracy (learning) and source accuracy (forgetting), "
        "and reports each method's frontier of the two and its source accuracy at the target levels every method "
        "reaches (retention at equal learning), with trainable values, time and memory. Writes "
        "DIR/demo_results.json and DIR/demo.png. On the CPU it uses a torch thread per idle core (OMP_NUM_THREADS, "
        "when set, decides instead).",
    )
    p.add_argument("--quick", action="store_true", help="a reduced smoke run (1 to 2 minutes); numbers are indicative only")
    p.add_argument("--output", default="demo_out", help="output directory DIR (default: demo_out)")
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help=f"comma-separated methods among {','.join(LABELS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train and evaluate")
    p.add_argument("--seed", type=int, default=0, help="seed of the target data split and of fine-tuning")
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from liftft.demo import parse_methods, run_demo

    run_demo(args.output, quick=args.quick, methods=parse_methods(args.methods), device=args.device, seed=args.seed,
             progress=args.progress)
    print(f"liftft demo: wrote {args.output}/demo_results.json and {args.output}/demo.png")
    return 0
