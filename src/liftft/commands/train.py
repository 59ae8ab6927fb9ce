"""`liftft train`: fine-tune a causal LM with LIFT or a baseline at the same budget."""

from __future__ import annotations

import argparse
import os

from liftft.commands import DefaultsShown, add_4bit_flags, add_progress_flag, target_modules_arg, lift_fields_as_flags
from liftft.engine.config import BIAS_CORRECTIONS, SVD_METHODS, LiftConfig
from liftft.engine.methods import METHODS
from liftft.data.records import parse_columns
from liftft.training.reporting import REPORT_TO, TENSORBOARD_DIR
from liftft.training.run_config import read_config_first


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        formatter_class=DefaultsShown,
        help="fine-tune a Hugging Face causal LM with LIFT or a baseline",
        description="Fine-tune a causal LM on instruction or conversational data. Sparse methods write DIR/delta.safetensors and "
        "DIR/liftft.json; PEFT methods write DIR/adapter; full writes DIR/merged. --merge also writes DIR/merged.",
    )
    p.add_argument("--model", required=True, help="base model: a hub id or a local directory")
    p.add_argument("--data", required=True, nargs="+",
                   help="training data: JSON, JSON Lines, Parquet or CSV files (by extension), datasets directories "
                   "or hub names, of records of one kind each: {instruction, input, output}; {messages: [{role, "
                   "content}, ...]} (rendered with the tokenizer's chat template, trained on the assistant turns); "
                   "or {prompt, completion}, strings or lists of turns (trained on the completion)")
    p.add_argument("--data-split", default="train", help="the split of a hub dataset or datasets directory")
    p.add_argument("--data-config", default=None, help="the configuration (subset) of a hub dataset")
    p.add_argument("--columns", default=None,
                   help="fill our fields from other columns, FIELD=COLUMN,...: e.g. instruction=question,output=answer "
                   "(fields: instruction, input, output, answer, messages, prompt, completion)")
    p.add_argument("--output", required=True, help="output directory DIR (checkpoints, logs, delta or model)")
    p.add_argument("--method", default="lift", choices=METHODS,
                   help="lift (principal weights), magnitude / random / principal-smallest (same engine, other "
                   "selectors), s2ft (random whole channels: rows of up/gate, columns of down, heads of v and o, "
                   "rows elsewhere; as many whole channels as fit in each matrix's budget, fixed for the run), "
                   "gradient (the largest |gradient| summed over the first --calibration-batches micro-batches, "
                   "selected once), full (AdamW on everything), lora / dora / pissa (PEFT)")
    p.add_argument("--calibration-batches", type=int, default=None,
                   help="--method gradient: the run's first N micro-batches, in training order, whose |gradient| "
                   "selects the entries (default: 16)")
    p.add_argument("--rank", type=int, default=None,
                   help="budget: LoRA rank r; sparse methods train min((m+n)*r, m*n) entries per matrix (default: 128)")
    p.add_argument("--density", type=float, default=None, help="budget for sparse methods: fraction of entries per matrix")
    p.add_argument("--filter-rank", type=int, default=64, help="rank of the SVD approximation LIFT selects from")
    p.add_argument("--update-interval", type=int, default=None,
                   help="optimizer steps between selection refreshes; 0 never refreshes (default: 400; --method "
                   "gradient selects once and takes none)")
    p.add_argument("--svd", default="randomized", choices=SVD_METHODS, help="SVD used for selection")
    p.add_argument("--block-size", type=int, default=None,
                   help="lift and principal-smallest: select whole B x B blocks, the budget // B^2 blocks with the "
                   "largest (smallest) sum of |W_r|, instead of single entries; B must divide every target's "
                   "dimensions (default: single entries)")
    p.add_argument("--bias-correction", default="matrix", choices=BIAS_CORRECTIONS,
                   help="sparse methods: whose step count AdamW's bias correction uses. matrix (the paper's): the "
                   "matrix's, so an entry newly selected at a refresh starts with zero moments but a large step count, "
                   "and its steps grow to 1.1x a fresh AdamW's under betas (0.9, 0.95), 3.8x under (0.9, 0.999); "
                   "entry: each entry counts its steps from the refresh that selected it, like a fresh AdamW, at 1 "
                   "byte more per trained entry")
    p.add_argument("--target-modules", type=target_modules_arg, default="all-linear",
                   help="all-linear, mlp, attn, a comma-separated list of module-name suffixes, or a regex")
    p.add_argument("--lr", "--learning-rate", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--loss", default="chunked", choices=("chunked", "full", "liger"),
                   help="how the cross-entropy is computed: chunked (the logits a chunk of tokens at a time, in forward "
                   "and backward), full (all the fp32 logits at once) or liger (Liger-Kernel's fused kernel: "
                   "pip install 'liftft[liger]'); a model whose logits are more than a linear head takes full")
    p.add_argument("--epochs", "--num-train-epochs", type=float, default=None, help="passes over the data (default: 3)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps, instead of --epochs")
    p.add_argument("--batch-size", "--per-device-train-batch-size", type=int, default=1,
                   help="examples per micro-batch (per process)")
    p.add_argument("--grad-accum", "--gradient-accumulation-steps", type=int, default=16,
                   help="micro-batches per optimizer step")
    p.add_argument("--max-seq-len", type=int, default=2048,
                   help="longer examples lose prompt tokens from the left, and conversations whole first exchanges "
                        "(their system prompt kept; docs/data.md); the response and EOS are never cut")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps of linear warmup")
    p.add_argument("--scheduler", default="linear", choices=("linear", "cosine", "constant"), help="lr decay after warmup")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm at this value; 0 disables")
    p.add_argument("--step-in-backward", action="store_true",
                   help="sparse methods: apply each matrix's update as soon as backward produces its gradient, so no "
                   "gathered gradients are kept (4 bytes per trained entry less at the peak; same result). Needs "
                   "--grad-accum 1, --max-grad-norm 0 and one process; a non-finite loss stops the run after its "
                   "update was applied"),
    p.add_argument("--fsdp", action="store_true",
                   help="sparse methods and full: shard the model with FSDP2 (torch's fully_shard on each decoder "
                   "layer and the root) over the launcher's processes (torchrun or accelerate launch; one process "
                   "without one), so each holds 1/N of the weights and of the optimizer state; rank 0 alone reads "
                   "the weights. With --bf16, FSDP2 computes in bf16 and reduces gradients in fp32. The loss is "
                   "computed from the full logits. The delta is that of an unsharded run; --resume needs --fsdp "
                   "and the same process count")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 mixed precision (default: on when a CUDA GPU supports it); with --load-in-4bit, the "
                   "4-bit layers compute in bf16 too")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--val-size", type=int, default=0,
                   help="hold out N records (fewer than --data holds) and log their loss (eval_loss) at the end and "
                   "every --eval-steps")
    p.add_argument("--eval-steps", type=int, default=None,
                   help="optimizer steps between evaluations of the --val-size held-out records (default: at the end only)")
    p.add_argument("--logging-steps", type=int, default=1,
                   help="optimizer steps per record in DIR/train_log.jsonl and --report-to: their mean loss, the last "
                   "one's lr and grad norm, tokens/s since the previous record and since the start (the last step "
                   "is always logged)")
    p.add_argument("--report-to", default="none", choices=REPORT_TO,
                   help=f"also send the logged values to TensorBoard (DIR/{TENSORBOARD_DIR}: pip install "
                   "'liftft[tensorboard]') or Weights & Biases (pip install 'liftft[wandb]'; WANDB_MODE, "
                   "WANDB_PROJECT and WANDB_DIR apply; the files go to DIR/wandb by default). --resume continues "
                   "the same W&B run (its id is in DIR/wandb_run.json) and drops the TensorBoard events after the "
                   "checkpoint, so that no step shows twice")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "chat"),
                   help="prompt template of instruction records, the same one `liftft eval` uses")
    p.add_argument("--seed", type=int, default=43, help="seed for data order, selection and initialization")
    p.add_argument("--save-steps", type=int, default=200, help="optimizer steps between checkpoints")
    p.add_argument("--save-total-limit", type=int, default=2,
                   help="checkpoints kept, newest first, so one bad step cannot erase the only good state "
                   "(a checkpoint whose trained values are not finite is never written; until the step after the "
                   "newest has run, the one before it is kept too; one whose weights made the next step diverge "
                   "is moved to checkpoints/diverged-step-N)")
    p.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="seconds a process waits for the others in a collective before stopping with an error "
                   "naming its rank (multi-process runs)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last good checkpoint in --output; it may change --lr and the length "
                   "(--max-steps, --epochs), e.g. to continue a diverged run at a lower --lr, and run.json records "
                   "each change")
    p.add_argument("--merge", action="store_true", help="also write a merged HF model to DIR/merged")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_progress_flag(p)
    read_config_first(p, alternatives=(("epochs", "max_steps"), ("rank", "density")))
    add_4bit_flags(p, "train on")
    p.set_defaults(func=run)


def train_args_from(args):
    """The TrainArgs of parsed CLI flags, with the budget and length defaults resolved."""
    from liftft.training.train import TrainArgs

    if args.rank is not None and args.density is not None:
        raise ValueError("--rank and --density contradict each other: give one")
    if args.epochs is not None and args.max_steps is not None:
        raise ValueError("--epochs and --max-steps contradict each other: give one")
    lift = LiftConfig(
        rank=args.rank if args.rank is not None or args.density is not None else LiftConfig.rank,
        density=args.density, filter_rank=args.filter_rank, update_interval=_update_interval(args),
        svd=args.svd, target_modules=args.target_modules, bias_correction=args.bias_correction,
        block_size=args.block_size,
    )
    return TrainArgs(
        model=args.model, data=args.data, output=args.output, method=args.method, lift=lift, lr=args.lr,
        calibration_batches=args.calibration_batches,
        epochs=args.epochs if args.epochs is not None or args.max_steps is not None else 3, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_seq_len=args.max_seq_len,
        warmup_ratio=args.warmup_ratio, scheduler=args.scheduler, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, step_in_backward=args.step_in_backward, fsdp=args.fsdp, bf16=args.bf16,
        load_in_4bit=args.load_in_4bit, bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        use_bnb_nested_quant=args.use_bnb_nested_quant,
        gradient_checkpointing=args.gradient_checkpointing, val_size=args.val_size, template=args.template,
        data_split=args.data_split, data_config=args.data_config,
        columns=parse_columns(args.columns) if args.columns is not None else None,
        seed=args.seed, resume=args.resume, merge=args.merge, save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, loss=args.loss, dist_timeout=args.dist_timeout, device=args.device,
        progress=args.progress, report_to=args.report_to, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
    )


def _update_interval(args) -> int | None:
    """--update-interval as LiftConfig takes it: 400 by default, None for 0 and for --method gradient."""
    if args.method == "gradient":
        if args.update_interval:
            raise ValueError(f"--method gradient selects once, from the calibration gradients, and never refreshes: "
                             f"drop --update-interval {args.update_interval}")
        return None
    return LiftConfig.update_interval if args.update_interval is None else args.update_interval or None


@lift_fields_as_flags()
def run(args) -> int:
    from liftft.training.train import train

    metrics = train(train_args_from(args))
    # The process group is gone by now; the launcher's RANK still says which process this is.
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"liftft train: done: {', '.join(f'{k}={v}' for k, v in metrics.items() if k != 'data')}")
    return 0
