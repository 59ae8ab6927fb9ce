"""LiftAdamW inside transformers.Trainer and TRL's SFTTrainer equals a plain loop."""


import pytest
import torch
from transformers import Trainer, TrainingArguments

from conftest import tiny_llama
from liftft import LiftAdamW, LiftConfig, LiftTrainerCallback
from liftft.data import DataCollator

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
    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        num_train_epochs=STEPS, max_grad_norm=0.05, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, dataloader_drop_last=False, seed=0, **kw,
    )


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
    assert opt.max_grad_norm == 0.05 and args.max_grad_norm == 0.0  # clipping moved into the optimizer
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
