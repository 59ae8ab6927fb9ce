"""One `liftft train` run: its settings, data, method, output directory and outputs (the loop is liftft.training.loop)."""

from __future__ import annotations

import json
import logging
import os
from importlib.metadata import version
from pathlib import Path

import torch

from liftft.utils import distributed
from liftft.training import run_dir
from liftft.utils.atomic import atomic_directory, write_json_atomic
from liftft.training.calibration import run_gradient_scores
from liftft.training.checkpoint import disk_errors_named
from liftft.deltas.card import CARD_FILE, write_model_cards
from liftft.data.batches import encode_dataset, load_records, split_validation
from liftft.deltas.delta import DELTA_FILE, META_FILE, save_delta
from liftft.training.fsdp import gathered_model, load_sharded
from liftft.utils.quantization import bnb_config, load_settings
from liftft.utils.hf import load_model, load_tokenizer, set_activation_checkpointing
from liftft.training.args import RESCHEDULABLE, TrainArgs, record_defaults
from liftft.training.loop import TrainingLoop
from liftft.deltas.merge import merge_delta
from liftft.engine.quantized import parameter_count
from liftft.engine.methods import SPARSE_SELECTORS, setup_method
from liftft.engine.preflight import check_budget, meta_model
from liftft.training.reporting import WANDB_RUN_FILE, Reporter, open_reporter

logger = logging.getLogger("liftft")

RUN_FILE = run_dir.RUN_FILE
MERGED_DIR = "merged"
LOG_NAME = "train.log"
ADAPTER_DIR = "adapter"
# Everything `liftft train` writes in its output dir besides checkpoints and logs.
OUTPUT_NAMES = (RUN_FILE, DELTA_FILE, META_FILE, CARD_FILE, MERGED_DIR, ADAPTER_DIR, WANDB_RUN_FILE)
def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; under a multi-process launcher, CUDA is this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and distributed.launched_distributed():
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(device)


def train(args: TrainArgs) -> dict:
    """Run one fine-tune and write its outputs to ``args.output``; returns the final metrics."""
    return run_training(args)[1]


def run_training(args: TrainArgs):
    """Like :func:`train`, returning (trained model, metrics).

    Under torchrun or accelerate launch every process joins the launcher's
    process group and trains on its share of each batch; rank 0 alone writes.
    """
    distributed.reject_deepspeed()
    device = resolve_device(args.device)
    if device.type == "cuda" and distributed.launched_distributed():
        torch.cuda.set_device(device)
    joined = distributed.init_from_launcher(device.type, timeout_s=args.dist_timeout)
    joined = joined or (args.fsdp and distributed.init_alone(device.type))
    try:
        with distributed.named_timeouts(args.dist_timeout):
            result = _run_training(args, device)
            # Rank 0 writes the outputs after the others are done; a rank that tore its group down meanwhile could
            # abort at exit ("terminate called without an active exception"), so all finish together.
            distributed.barrier()
            return result
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _run_training(args: TrainArgs, device: torch.device):
    out = Path(args.output)
    main = distributed.is_main_process()
    # Reading is quick; tokenising waits until every check has passed.
    records = load_records(args.data, split=args.data_split, config=args.data_config, columns=args.columns)
    created = not out.exists()
    lock = run_dir.take(out)
    try:
        changed = run_dir.check_continues(out, args.run_record(), record_defaults(), args.resume,
                                          changeable=RESCHEDULABLE)
        split_validation(records, args.val_size, args.seed)  # a --val-size the data cannot spare, before any work
        budget_note = check_budget(meta_model(args.model), args.lift_config(), args.method in SPARSE_SELECTORS)
        distributed.barrier()  # every rank has read the output dir before rank 0 writes to it
        if main:
            _announce(args, budget_note, run_dir.remove_run_leftovers(out, OUTPUT_NAMES))
        return _train_in(args, device, out, records, changed)
    except BaseException:
        if created and lock is not None:
            run_dir.release(lock)
            run_dir.remove_if_empty(out, log_name=LOG_NAME)
        raise
    finally:
        if lock is not None:
            run_dir.release(lock)


def _train_in(args: TrainArgs, device: torch.device, out: Path, records: list[dict], changed: dict):
    """Train in ``out``, logging to DIR/train.log from the first step of the work on (rank 0)."""
    handler = _log_to(out) if distributed.is_main_process() else logging.NullHandler()
    try:
        logger.info("liftft train %s: %s", version("liftft"), json.dumps(args.run_record(), default=str))
        return _train_logged(args, device, out, records, changed)
    finally:
        logger.removeHandler(handler)
        handler.close()


def _train_logged(args: TrainArgs, device: torch.device, out: Path, records: list[dict], changed: dict):
    """Train; ``changed`` holds the settings this resumption changed, {name: (recorded, now)}."""
    main = distributed.is_main_process()
    bf16 = args.bf16 if args.bf16 is not None else device.type == "cuda" and torch.cuda.is_bf16_supported()

    tokenizer = load_tokenizer(args.model)
    train_examples, val_examples, data_stats = _prepare_data(args, records, tokenizer)
    torch.manual_seed(args.seed)
    # Frozen or sparsely trained weights stay in bf16; full FT keeps fp32 weights under autocast.
    weight_dtype = torch.bfloat16 if bf16 and args.method != "full" else torch.float32
    model = _load_base(args, weight_dtype, device, bf16)
    scores = run_gradient_scores(args, model, train_examples, tokenizer.pad_token_id, device, bf16)
    setup = setup_method(model, args.method, args.lift_config(), lr=args.lr, weight_decay=args.weight_decay,
                         max_grad_norm=args.max_grad_norm, step_in_backward=args.step_in_backward, scores=scores)
    model = setup.model
    share = f"{setup.trainable / parameter_count(model):.2%} of {type(model).__name__}"
    logger.info("method %s: %s trainable values (%s)", args.method, f"{setup.trainable:,}", share)
    if main:
        print(f"liftft train: method={args.method} trainable={setup.trainable:,} ({share})")

    loop = TrainingLoop(args, model, setup, train_examples, tokenizer.pad_token_id, device, bf16,
                        val_examples=val_examples)
    loop.changed = changed
    loop.maybe_resume()
    run_info = {"args": args.run_record(), "options": args.options(), "world_size": distributed.world_size()}
    changes = run_dir.recorded_changes(out) + ([_change_record(changed, loop.step + 1)] if changed else [])
    if changes:  # each change of --lr or the length on --resume, and the first step that ran with it
        run_info["changes"] = changes
    if main:
        write_json_atomic(out / RUN_FILE, {**run_info, "status": "running", "data": data_stats,
                                           "trainable": setup.trainable})
    settings = {**run_info["args"], **run_info["options"]}
    resumed_at = loop.step if args.resume else None
    with open_reporter(args.report_to, out, settings, resumed_at=resumed_at) if main else Reporter() as reporter:
        loop.reporter = reporter
        metrics = loop.run()
    metrics.update(trainable=setup.trainable, data=data_stats)
    if main or args.fsdp:  # under FSDP2 every rank contributes its rows or shards to what rank 0 writes
        with disk_errors_named(out):
            _write_outputs(args, setup, tokenizer, metrics)
    if main:
        write_json_atomic(out / RUN_FILE, {**run_info, "status": "done", "metrics": metrics,
                                           "trainable": setup.trainable})
    logger.info("done: %s", json.dumps({k: v for k, v in metrics.items() if k != "data"}))
    return model, metrics


def _change_record(changed: dict, first_step: int) -> dict:
    """run.json's record of one resumption's changed settings: ``{"first_step": 2, "lr": {"from": 1e10, "to":
    0.001}}``, ``first_step`` being the first optimizer step that ran with the new values."""
    return {"first_step": first_step, **{name: {"from": old, "to": new} for name, (old, new) in changed.items()}}


def _load_base(args: TrainArgs, dtype: torch.dtype, device: torch.device, bf16: bool):
    """The base model in ``dtype`` on ``device``: whole, under --fsdp sharded as it loads (rank 0 reads it), or under
    --load-in-4bit quantized as it loads, its 4-bit layers computing in bf16 with --bf16, else in fp32."""
    if args.fsdp:
        return load_sharded(args.model, dtype, device, bf16, checkpointing=args.gradient_checkpointing)
    quantization = bnb_config(args.bnb_4bit_quant_type, args.use_bnb_nested_quant,
                              torch.bfloat16 if bf16 else torch.float32) if args.load_in_4bit else None
    model = load_model(args.model, dtype=dtype, device=device, quantization_config=quantization)
    if args.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    return model


def _announce(args: TrainArgs, budget_note: str | None, removed: list[Path]) -> None:
    """Say what will run (processes, global batch), and what the launcher asked for if it differs; report the
    budget's note and the leftovers of interrupted writes that were removed."""
    world = distributed.world_size()
    sharding = ", FSDP2-sharded" if args.fsdp else ""
    print(f"liftft train: {world} process{'es' if world > 1 else ''}{sharding}, global batch {args.batch_size} x "
          f"{args.grad_accum} x {world} = {args.batch_size * args.grad_accum * world} examples per optimizer step")
    asked = distributed.requested_processes(distributed.launcher_cmdline())
    if asked is not None and asked > world:
        print(f"liftft train: warning: the launcher asked for {asked} processes but {world} joined (accelerate "
              "launch --cpu runs one process without MPI; torchrun --nproc-per-node N runs N on the CPU)")
    if budget_note:
        print(f"liftft train: warning: {budget_note}")
    if removed:
        print(f"liftft train: removed {len(removed)} leftover(s) of interrupted writes: "
              f"{', '.join(p.name for p in removed)}")


def _prepare_data(args: TrainArgs, records: list[dict], tokenizer):
    train_records, val_records = split_validation(records, args.val_size, args.seed)
    train_examples, stats = encode_dataset(train_records, tokenizer, template=args.template, max_seq_len=args.max_seq_len)
    val_examples = encode_dataset(val_records, tokenizer, template=args.template, max_seq_len=args.max_seq_len)[0] if val_records else []
    logger.info("data: %s", stats)
    return train_examples, val_examples, stats


def _log_to(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / LOG_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def _write_outputs(args: TrainArgs, setup, tokenizer, metrics: dict) -> None:
    """Write the run's outputs from rank 0; under --fsdp every rank calls this, to gather the delta or model."""
    out = Path(args.output)
    model = setup.model
    if setup.kind == "sparse":
        save_delta(setup.optimizer, out, base_model=args.model, training_args=args.run_record(), metrics=metrics)
        # Sharded or 4-bit, the model in memory is not the 16-bit model to write: the base plus the delta, on the CPU.
        if args.merge and (args.fsdp or args.load_in_4bit) and distributed.is_main_process():
            merge_delta(args.model, str(out), str(out / MERGED_DIR))
        elif args.merge and not (args.fsdp or args.load_in_4bit):
            _save_hf(model, tokenizer, out / MERGED_DIR, args.gradient_checkpointing)
    elif setup.kind == "peft":
        with atomic_directory(out / ADAPTER_DIR) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if args.merge:
            _save_hf(model.merge_and_unload(), tokenizer, out / MERGED_DIR, args.gradient_checkpointing)
    elif args.fsdp:  # the whole model, gathered on rank 0's CPU
        whole = gathered_model(model)
        if whole is not None:
            _save_hf(whole, tokenizer, out / MERGED_DIR, checkpointing=False)
    else:
        _save_hf(model, tokenizer, out / MERGED_DIR, args.gradient_checkpointing)
    if distributed.is_main_process():
        quantization = {"quantization": load_settings(args.bnb_4bit_quant_type, args.use_bnb_nested_quant)
                        } if args.load_in_4bit else {}
        write_model_cards([out, out / MERGED_DIR], {"base_model": args.model, "config": args.lift_config().to_dict(),
                                                    "training_args": args.run_record(), "metrics": metrics,
                                                    **quantization})


def _save_hf(model, tokenizer, path: Path, checkpointing: bool) -> None:
    if checkpointing:
        set_activation_checkpointing(model, False)
    model.config.use_cache = True
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
