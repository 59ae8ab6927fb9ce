"""LiftAdamW inside transformers.Trainer and TRL's SFTTrainer equals a plain loop; the callback's clipping,
reports and saved deltas; lift_optimizers; GRPO through TRL (examples/grpo_lift.py)."""


import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft import LiftTrainerCallback
from liftft import lift_optimizers
from liftft.data.batches import DataCollator

pytestmark = pytest.mark.filterwarnings("ignore")

CFG = LiftConfig(rank=2, filter_rank=4, update_interval=2)
STEPS, MICRO, ACCUM = 3, 2, 4


def examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(MICRO * ACCUM):
        ids = torch.randint(3, 512, (8 + i,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def plain_loop(model, max_grad_norm):
    """One optimizer step per pass over all examples, loss summed over tokens / tokens in the step."""
    opt = LiftAdamW(model, CFG, lr=1e-2, max_grad_norm=max_grad_norm)
    collate = DataCollator(0)
    data = examples()
    for _ in range(STEPS):
        batches = [collate(data[i:i + MICRO]) for i in range(0, len(data), MICRO)]
        n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                     ignore_index=-100, reduction="sum")
            (loss / n_tokens).backward()
        opt.step()
        opt.zero_grad()
    return model


def trainer_args(tmp_path, **kw):
    """The arguments of these tests; ``logging_steps`` turns logging on."""
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        num_train_epochs=STEPS, max_grad_norm=0.05, report_to=[], save_strategy="no",
        logging_strategy="steps" if "logging_steps" in kw else "no", use_cpu=True, dataloader_drop_last=False, seed=0,
    )
    return TrainingArguments(**{**settings, **kw})


def constant_schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def assert_same_weights(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6, msg=name)


def test_trainer_matches_plain_loop(tmp_path):
    reference = plain_loop(tiny_llama(), max_grad_norm=0.05)
    model = tiny_llama()
    opt = LiftAdamW(model, CFG, lr=1e-2)
    args = trainer_args(tmp_path)
    trainer = Trainer(model=model, args=args, train_dataset=examples(), data_collator=DataCollator(0),
                      optimizers=(opt, constant_schedule(opt)), callbacks=[LiftTrainerCallback()])
    trainer.train()
    # The optimizer clipped; the Trainer's own clipping was off during each step and its setting is back.
    assert opt.max_grad_norm == 0.05 and args.max_grad_norm == 0.05
    assert opt.param_groups[0]["steps"] == STEPS and opt.param_groups[0]["refreshes"] == 1
    assert_same_weights(model, reference)


def test_trainer_without_callback_would_clip_wrongly(tmp_path):
    # Without the callback the Trainer clips nothing of the gathered gradients: a different result.
    reference = plain_loop(tiny_llama(), max_grad_norm=0.05)
    model = tiny_llama()
    opt = LiftAdamW(model, CFG, lr=1e-2)
    Trainer(model=model, args=trainer_args(tmp_path), train_dataset=examples(), data_collator=DataCollator(0),
            optimizers=(opt, constant_schedule(opt))).train()
    with pytest.raises(AssertionError):
        assert_same_weights(model, reference)


def test_callback_refuses_conflicting_clip(tmp_path):
    model = tiny_llama()
    opt = LiftAdamW(model, CFG, lr=1e-2, max_grad_norm=0.3)
    trainer = Trainer(model=model, args=trainer_args(tmp_path), train_dataset=examples(),
                      data_collator=DataCollator(0), optimizers=(opt, constant_schedule(opt)),
                      callbacks=[LiftTrainerCallback()])
    with pytest.raises(ValueError, match="max_grad_norm=0.05 conflicts with LiftAdamW"):
        trainer.train()


def test_sft_trainer_matches_plain_loop(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from conftest import train_tokenizer

    reference = plain_loop(tiny_llama(), max_grad_norm=0.05)
    model = tiny_llama()
    opt = LiftAdamW(model, CFG, lr=1e-2)
    # Pre-tokenized rows whose completion mask hides the same 3 prompt tokens as the labels above.
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "completion_mask": [0] * 3 + [1] * (len(e["input_ids"]) - 3)}
                                 for e in examples()])
    config = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        num_train_epochs=STEPS, max_grad_norm=0.05, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, seed=0, completion_only_loss=True, bf16=False,  # SFTConfig defaults to bf16
    )
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=dataset, optimizers=(opt, constant_schedule(opt)),
                             callbacks=[LiftTrainerCallback()], processing_class=train_tokenizer(["a b c"], vocab_size=300))
    trainer.train()
    assert_same_weights(model, reference)


def test_step_in_backward_under_trainer_equals_the_ordinary_path(tmp_path):
    models = {}
    for mode in (False, True):
        model = tiny_llama()
        opt = LiftAdamW(model, CFG, lr=1e-2, step_in_backward=mode)
        args = trainer_args(tmp_path / str(mode))
        args.gradient_accumulation_steps, args.max_grad_norm = 1, 0.0
        Trainer(model=model, args=args, train_dataset=examples(), data_collator=DataCollator(0),
                optimizers=(opt, constant_schedule(opt)), callbacks=[LiftTrainerCallback()]).train()
        assert opt.param_groups[0]["steps"] == STEPS * ACCUM
        models[mode] = model
    for (name, p), q in zip(models[True].named_parameters(), models[False].parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("setting,match", [("max_grad_norm", r"cannot clip; set TrainingArguments\(max_grad_norm=0\)"),
                                           ("gradient_accumulation_steps", "cannot accumulate gradients")])
def test_callback_refuses_what_step_in_backward_cannot_do(tmp_path, setting, match):
    model = tiny_llama()
    opt = LiftAdamW(model, CFG, lr=1e-2, step_in_backward=True)
    args = trainer_args(tmp_path)  # clips at 0.05 and accumulates 4 micro-batches
    if setting == "max_grad_norm":
        args.gradient_accumulation_steps = 1
    else:
        args.max_grad_norm = 0.0
    trainer = Trainer(model=model, args=args, train_dataset=examples(), data_collator=DataCollator(0),
                      optimizers=(opt, constant_schedule(opt)), callbacks=[LiftTrainerCallback()])
    with pytest.raises(ValueError, match=match):
        trainer.train()


# ----- lift_optimizers, and what the callback reports and saves -----

def lr_trajectory(tmp_path, optimizers, **kw):
    """The learning rates a Trainer logs, step by step, with ``optimizers(model, args)``."""
    model = tiny_llama()
    args = trainer_args(tmp_path, learning_rate=3e-3, warmup_steps=1, lr_scheduler_type="cosine", logging_steps=1,
                        adam_beta2=0.99, weight_decay=0.1, **kw)
    built = optimizers(model, args)
    callbacks = [LiftTrainerCallback(save_deltas=False)] if built[0] is not None else []
    trainer = Trainer(model=model, args=args, train_dataset=examples(), data_collator=DataCollator(0),
                      optimizers=built, callbacks=callbacks)
    trainer.train()
    return [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]


def test_lift_optimizers_takes_every_setting_from_the_training_arguments(tmp_path):
    args = trainer_args(tmp_path, learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-7,
                        weight_decay=0.1, max_steps=5)
    opt, scheduler = lift_optimizers(tiny_llama(), args, CFG)
    group = opt.param_groups[0]
    assert (group["initial_lr"], group["betas"], group["eps"], group["weight_decay"], opt.max_grad_norm) == \
        (3e-3, (0.8, 0.99), 1e-7, 0.1, 0.05)
    # Without max_steps the count of steps waits for the dataset: the Trainer builds the same schedule itself.
    assert lift_optimizers(tiny_llama(), trainer_args(tmp_path), CFG)[1] is None
    # The Trainer's own optimizer follows the same arguments: the logged schedules agree, warmup and cosine included.
    reference = lr_trajectory(tmp_path / "own", lambda model, args: (None, None))
    assert lr_trajectory(tmp_path / "built", lambda model, args: lift_optimizers(model, args, CFG)) == reference
    assert lr_trajectory(tmp_path / "steps", lambda model, args: lift_optimizers(model, args, CFG),
                         max_steps=STEPS) == reference
    assert reference[:2] == [0.0, 3e-3] and len(set(reference)) == STEPS  # one warmup step, then cosine


def test_callback_warns_when_the_trainer_would_ignore_the_learning_rate(tmp_path):
    model = tiny_llama()
    opt = LiftAdamW(model, CFG, lr=1e-2)
    args = trainer_args(tmp_path, learning_rate=5e-5)
    trainer = Trainer(model=model, args=args, train_dataset=examples(), data_collator=DataCollator(0),
                      optimizers=(opt, None), callbacks=[LiftTrainerCallback(save_deltas=False)])
    with pytest.warns(UserWarning, match=r"learning_rate=5e-05 \(LiftAdamW has 0.01\).*lift_optimizers"):
        trainer.train()


def test_callback_stays_silent_with_lift_optimizers(tmp_path):
    import warnings

    model = tiny_llama()
    args = trainer_args(tmp_path, learning_rate=5e-5)
    trainer = Trainer(model=model, args=args, train_dataset=examples(), data_collator=DataCollator(0),
                      optimizers=lift_optimizers(model, args, CFG), callbacks=[LiftTrainerCallback(save_deltas=False)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "TrainingArguments" in str(w.message)]


def first_step_gradient_norm() -> float:
    """The norm over the selected entries of the first step's gradient, by plain autograd on an unhooked model."""
    hooked, plain = tiny_llama(), tiny_llama()
    with LiftAdamW(hooked, CFG) as opt:
        selected = {name: opt.indices(name).long() for name in opt.target_names}
    collate, data = DataCollator(0), examples()
    batches = [collate(data[i:i + MICRO]) for i in range(0, len(data), MICRO)]
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        logits = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")
        (loss / n_tokens).backward()
    params = dict(plain.named_parameters())
    return torch.linalg.vector_norm(torch.cat([params[n].grad.flatten()[i] for n, i in selected.items()])).item()


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0])
def test_logged_grad_norm_is_the_optimizers(tmp_path, max_grad_norm):
    model = tiny_llama()
    opt = LiftAdamW(model, CFG, lr=1e-2)
    args = trainer_args(tmp_path, logging_steps=1, max_grad_norm=max_grad_norm)
    trainer = Trainer(model=model, args=args, train_dataset=examples(), data_collator=DataCollator(0),
                      optimizers=(opt, constant_schedule(opt)), callbacks=[LiftTrainerCallback(save_deltas=False)])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == STEPS
    if max_grad_norm:
        assert logged[0]["grad_norm"] == pytest.approx(first_step_gradient_norm(), rel=1e-5)
        assert all(entry["grad_norm"] > 0 for entry in logged)
    else:  # the optimizer computed no norm, and the Trainer's 0.0 would be wrong: no figure rather than a false one
        assert not any("grad_norm" in entry for entry in logged)


def test_trainer_logs_the_trained_count(tmp_path):
    import logging

    from liftft.training.integrations import trainer_logger
    from liftft.engine.selection import budget
    from liftft.engine.targets import find_targets

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    trainer_logger.addHandler(handler)
    level = trainer_logger.level
    trainer_logger.setLevel(logging.INFO)
    try:
        model = tiny_llama()
        opt = LiftAdamW(model, CFG, lr=1e-2)
        Trainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=examples(),
                data_collator=DataCollator(0), optimizers=(opt, constant_schedule(opt)),
                callbacks=[LiftTrainerCallback(save_deltas=False)]).train()
    finally:
        trainer_logger.removeHandler(handler)
        trainer_logger.setLevel(level)
    expected = sum(budget(tuple(p.shape), rank=CFG.rank) for p in find_targets(tiny_llama(), "all-linear").values())
    messages = [r.getMessage() for r in records]
    trainers_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any(f"Number of trainable parameters = {trainers_count:,}" in m for m in messages)  # the Trainer's
    assert any(f"liftft: trainable params: {expected:,d} ||" in m for m in messages) and trainers_count > 2 * expected


def test_checkpoints_and_output_get_the_delta(tmp_path):
    from transformers import AutoModelForCausalLM

    from liftft import apply_delta
    from liftft import load_delta

    model = tiny_llama()
    args = trainer_args(tmp_path, save_strategy="steps", save_steps=2, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=examples(), data_collator=DataCollator(0),
                      optimizers=lift_optimizers(model, args, CFG), callbacks=[LiftTrainerCallback()])
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    # The checkpoint's full model, which the Trainer wrote, is the base plus the checkpoint's delta, exactly.
    saved = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert_exactly_equal(apply_delta(tiny_llama(), checkpoint), saved)
    assert_exactly_equal(apply_delta(tiny_llama(), tmp_path), model)
    meta = load_delta(tmp_path).meta
    assert meta["metrics"]["global_step"] == STEPS and meta["training_args"]["learning_rate"] == args.learning_rate
    # training_args.bin (the Trainer's pickle, read here only) records the clipping that was done, not 0.
    assert torch.load(checkpoint / "training_args.bin", weights_only=False).max_grad_norm == 0.05
    assert not [p.name for p in tmp_path.rglob(".*")]  # no temporaries left behind


def assert_exactly_equal(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_grpo_example_trains_selected_entries_refreshes_and_saves(tmp_path):
    pytest.importorskip("trl")
    import importlib.util
    from pathlib import Path

    from conftest import train_tokenizer
    from liftft import apply_delta
    from liftft import load_delta

    spec = importlib.util.spec_from_file_location("grpo_lift", Path(__file__).parents[1] / "examples" / "grpo_lift.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    tiny_llama(vocab_size=300).save_pretrained(tmp_path / "base")
    train_tokenizer(["a b c aa bb say something write a word answer go on"] * 10, vocab_size=300).save_pretrained(
        tmp_path / "base")
    trainer = example.main(["--model", str(tmp_path / "base"), "--output", str(tmp_path / "out"), "--steps", "4"])
    opt, policy, base = trainer.optimizer.optimizer, trainer.model, tiny_llama(vocab_size=300)
    assert opt.param_groups[0]["refreshes"] == 2  # every 2 of the 4 steps
    delta = load_delta(tmp_path / "out")
    for name, p in policy.named_parameters():
        moved = (p != dict(base.named_parameters())[name]).flatten().nonzero().flatten()
        if name in delta.entries:
            assert set(moved.tolist()) <= set(delta.entries[name][0].tolist()), name  # only entries it selected
        else:
            assert moved.numel() == 0, name  # embeddings, norms, lm_head: untouched
    assert sum(((p != q).sum().item() for p, q in zip(policy.parameters(), base.parameters()))) > 0
    assert_exactly_equal(apply_delta(base, tmp_path / "out"), policy)
    assert (tmp_path / "out" / "checkpoint-2" / "delta.safetensors").is_file()
