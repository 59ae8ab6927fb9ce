"""`liftft train` end to end on a tiny Llama: learning, outputs, resume, atomic checkpoints, bad input."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import math_records, run_interrupted
from liftft import LiftConfig
from liftft import apply_delta
from liftft import load_delta
from liftft.training.checkpoint import LATEST, latest_checkpoint, load_checkpoint
from liftft.cli import build_parser, main
from liftft.commands.train import train_args_from
from liftft.data.batches import DataCollator, encode_dataset
from liftft.training.loop import TrainingDiverged, TrainingLoop
from liftft.training.train import TrainArgs, run_training

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

LR = {"lift": 2e-2, "full": 2e-3, "lora": 3e-2}
LIFT = LiftConfig(rank=2, filter_rank=4, update_interval=3)


def args_for(base_dir, data_file, out, method="lift", **kw):
    settings = dict(model=str(base_dir), data=[str(data_file)], output=str(out), method=method, lift=LIFT,
                    lr=LR.get(method, 2e-2), max_steps=8, epochs=None,
                    batch_size=2, grad_accum=2, max_seq_len=192, warmup_ratio=0.0, progress=False, seed=7)
    settings.update(kw)
    return TrainArgs(**settings)


def mean_loss(model, base_dir, data_file):
    from liftft.utils.hf import load_tokenizer

    tok = load_tokenizer(str(base_dir))
    examples, _ = encode_dataset(math_records(12), tok, max_seq_len=192)
    batch = DataCollator(tok.pad_token_id)(examples)
    with torch.no_grad():
        return model(**batch).loss.item()


def logits(model, ids=torch.arange(3, 40)[None]):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["lift", "full", "lora"])
def test_end_to_end(method, base_dir, data_file, tmp_path, capsys):
    out = tmp_path / method
    model, metrics = run_training(args_for(base_dir, data_file, out, method, merge=True))
    printed = capsys.readouterr().out
    assert f"trainable={metrics['trainable']:,}" in printed
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    assert mean_loss(model, base_dir, data_file) < mean_loss(base, base_dir, data_file) - 0.05

    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(logits(merged), logits(model), rtol=1e-5, atol=1e-5)
    if method == "lift":
        apply_delta(base, out)
        for (name, a), b in zip(base.named_parameters(), merged.parameters()):
            assert torch.equal(a, b), name
        meta = json.loads((out / "liftft.json").read_text())
        assert meta["base_model"] == str(base_dir) and meta["training_args"]["method"] == "lift"
        assert "train_loss" in meta["metrics"]
    if method == "lora":
        assert (out / "adapter" / "adapter_config.json").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))


def test_lift_and_lora_train_the_same_number_of_values(base_dir, data_file, tmp_path):
    counts = {m: run_training(args_for(base_dir, data_file, tmp_path / m, m, max_steps=1))[1]["trainable"]
              for m in ("lift", "lora", "random")}
    # tiny_llama: 2 layers x (q 32x32, k 16x32, v 16x32, o 32x32, gate/up 64x32, down 32x64), r = 2.
    per_layer = sum((m + n) * 2 for m, n in [(32, 32), (16, 32), (16, 32), (32, 32), (64, 32), (64, 32), (32, 64)])
    assert counts == {"lift": 2 * per_layer, "lora": 2 * per_layer, "random": 2 * per_layer}


def _final_delta(out):
    return {k: v for k, (_, v) in load_delta(out).entries.items()}


def test_resume_equals_uninterrupted(base_dir, data_file, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    run_training(args_for(base_dir, data_file, straight, save_steps=2))

    interrupted = tmp_path / "interrupted"
    run_interrupted(monkeypatch, 5, lambda: run_training(args_for(base_dir, data_file, interrupted, save_steps=2)))
    assert latest_checkpoint(interrupted).name == "step-00000004"
    run_training(args_for(base_dir, data_file, interrupted, save_steps=2, resume=True))
    a, b = _final_delta(straight), _final_delta(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Step 5 was logged before the interruption and again after the resumption from step 4: it is in the log once.
    logs = [[json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
            for out in (straight, interrupted)]
    assert [(r["step"], r["loss"], r["tokens"]) for r in logs[0]] == [(r["step"], r["loss"], r["tokens"]) for r in logs[1]]


def test_kill_during_checkpoint_leaves_previous_loadable(base_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    import liftft.training.checkpoint as ckpt

    real_save = torch.save
    calls = {"n": 0}

    def killed_mid_write(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: write half a file, then die
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(ckpt.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run_training(args_for(base_dir, data_file, out, save_steps=2))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert (out / "checkpoints" / LATEST).read_text() == "step-00000002"
    load_checkpoint(latest_checkpoint(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [LATEST, "step-00000002"]  # no temp dir left

    run_training(args_for(base_dir, data_file, out, save_steps=2, resume=True))
    straight = tmp_path / "straight"
    run_training(args_for(base_dir, data_file, straight, save_steps=2))
    a, b = _final_delta(straight), _final_delta(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_checkpoint(base_dir, data_file, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    original = TrainingLoop.loss_sum

    def nan_at_step_3(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.step == 2 else loss

    monkeypatch.setattr(TrainingLoop, "loss_sum", nan_at_step_3)
    # Step 2's weights gave the NaN: their checkpoint is set aside, and step 1's, from which training went on, named.
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3; stopped. Checkpoint step-00000002, whose "
                       "weights led there, was moved to .*diverged-step-00000002. Last good checkpoint: .*step-00000001"):
        run_training(args_for(base_dir, data_file, out, save_steps=1))
    assert latest_checkpoint(out).name == "step-00000001"
    load_checkpoint(latest_checkpoint(out))


def test_val_size_reports_eval_loss(base_dir, data_file, tmp_path):
    _, metrics = run_training(args_for(base_dir, data_file, tmp_path / "v", val_size=3, max_steps=2))
    assert metrics["eval_loss"] > 0 and metrics["data"]["examples"] == 9


def _cli(*argv):
    return main(["train", *map(str, argv)])


def test_step_in_backward_writes_the_same_delta(base_dir, data_file, tmp_path):
    runs = {}
    for mode in (False, True):
        out = tmp_path / str(mode)
        run_training(args_for(base_dir, data_file, out, grad_accum=1, max_grad_norm=None, step_in_backward=mode))
        runs[mode] = load_delta(out)
    assert runs[True].entries.keys() == runs[False].entries.keys() and runs[True].num_entries > 0
    for name, (indices, values) in runs[True].entries.items():
        want_indices, want_values = runs[False].entries[name]
        assert torch.equal(indices, want_indices) and torch.equal(values, want_values), name
    assert runs[True].meta["training_args"]["step_in_backward"] and not runs[False].meta["training_args"]["step_in_backward"]


def test_chunked_and_full_loss_train_alike(base_dir, data_file, tmp_path):
    runs = {}
    for loss in ("full", "chunked"):
        out = tmp_path / loss
        run_training(args_for(base_dir, data_file, out, max_steps=3, loss=loss))
        logged = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        runs[loss] = logged, load_delta(out).entries
    (full_losses, full_delta), (losses, delta) = runs["full"], runs["chunked"]
    assert losses == pytest.approx(full_losses, rel=1e-5)
    assert delta.keys() == full_delta.keys()
    for name, (indices, values) in delta.items():
        assert torch.equal(indices, full_delta[name][0]), name
        torch.testing.assert_close(values, full_delta[name][1], rtol=0, atol=1e-4, msg=name)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--epochs", "1", "--max-steps", "2"], "--epochs and --max-steps contradict"),
        (["--rank", "2", "--density", "0.1"], "--rank and --density contradict"),
        (["--target-modules", "nope_proj"], "matched no module; linear modules in this model: model.layers.0.self_attn.q_proj"),
        (["--step-in-backward", "--max-grad-norm", "0"], "needs --grad-accum 1 (got 16)"),
        (["--step-in-backward", "--grad-accum", "1"], "cannot clip: pass --max-grad-norm 0 (got 1.0)"),
        (["--step-in-backward", "--method", "lora"], "for the sparse methods (lift, magnitude"),
    ],
)
def test_bad_flags(extra, message, base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "o"
    assert _cli("--model", base_dir, "--data", data_file, "--output", out, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (out / "run.json").exists()


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "not-there.json"),
        ('[{"instruction": "a", "output": "b"},\n {"instruction": }]', "line 2 column"),
        ('[{"instruction": "a", "output": "b"}, {"output": "b"}]', "record 1"),
        ("[]", "empty dataset"),
    ],
)
def test_bad_data(content, message, base_dir, tmp_path, capsys):
    data = tmp_path / "not-there.json"
    if content is not None:
        data.write_text(content)
    assert _cli("--model", base_dir, "--data", data, "--output", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert message in err and "not-there.json" in err


def test_missing_model(data_file, tmp_path, capsys):
    assert _cli("--model", tmp_path / "no-model", "--data", data_file, "--output", tmp_path / "o") == 2
    assert "no-model" in capsys.readouterr().err


def one_step_cli_run(base_dir, data_file, out, *extra) -> list:
    """Train one step through the CLI into ``out``; returns the flags, to run it again."""
    flags = ["--model", base_dir, "--data", data_file, "--output", out, "--max-steps", "1", "--rank", "1",
             "--filter-rank", "2", "--no-progress", *extra]
    assert _cli(*flags) == 0
    return flags


def rewrite_recorded_args(out, keep) -> None:
    """Keep only the recorded settings for which ``keep(name)`` holds, as an older liftft would have recorded them."""
    record = json.loads((out / "run.json").read_text())
    record["args"] = {k: v for k, v in record["args"].items() if keep(k)}
    (out / "run.json").write_text(json.dumps(record))


def test_output_dir_holding_another_run(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "o"
    common = one_step_cli_run(base_dir, data_file, out)
    # A run recorded before a setting existed counts as having run with its default.
    rewrite_recorded_args(out, lambda name: name != "step_in_backward")
    assert _cli(*common, "--lr", "0.5") == 2
    assert "holds a different run (differs in: lr)" in capsys.readouterr().err
    assert _cli(*common, "--lr", "0.5", "--step-in-backward", "--grad-accum", "1", "--max-grad-norm", "0") == 2
    assert "differs in: grad_accum, lr, max_grad_norm, step_in_backward)" in capsys.readouterr().err
    assert _cli(*common) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_bf16_with_gradient_checkpointing_applies_exactly(base_dir, data_file, tmp_path):
    out = tmp_path / "bf16"
    model, _ = run_training(args_for(base_dir, data_file, out, bf16=True, gradient_checkpointing=True, max_steps=4))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    untouched = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    base = apply_delta(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16), out)
    for (name, a), b in zip(base.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, untouched.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("method", ["dora", "pissa"])
def test_other_peft_methods_start_from_the_base_function(method, base_dir, data_file, tmp_path):
    from liftft.utils.hf import load_model
    from liftft.engine.methods import setup_method

    base = load_model(str(base_dir))
    reference = logits(base)
    setup = setup_method(load_model(str(base_dir)), method, LIFT)
    # DoRA and PiSSA initialise so that the adapted model computes exactly what the base did.
    torch.testing.assert_close(logits(setup.model), reference, rtol=1e-4, atol=1e-4)
    _, metrics = run_training(args_for(base_dir, data_file, tmp_path / method, method, max_steps=2, lr=1e-3))
    assert metrics["trainable"] == setup.trainable and (tmp_path / method / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["lift", "full"])
def test_max_grad_norm_zero_trains_without_clipping(method, base_dir, data_file, tmp_path):
    assert args_for(base_dir, data_file, tmp_path, method, max_grad_norm=0).max_grad_norm is None
    trained = {norm: dict(run_training(args_for(base_dir, data_file, tmp_path / str(norm), method, max_steps=3,
                                                max_grad_norm=norm))[0].named_parameters())
               for norm in (0, None, 1e-3)}
    assert all(torch.equal(trained[0][name], p) for name, p in trained[None].items())
    # Clipping at 1e-3 does change the run, so the equality above is not vacuous.
    assert not all(torch.equal(trained[1e-3][name], p) for name, p in trained[None].items())


@pytest.mark.parametrize(
    "kw,error,message",
    [
        (dict(lift=LiftConfig(selector="magnitude")), ValueError,
         "LiftConfig.selector='magnitude' contradicts method 'lift', which selects principal"),
        (dict(method="lora", lift=LiftConfig(selector="random")), ValueError,
         "LiftConfig.selector='random' contradicts method 'lora', which selects nothing"),
        (dict(lift=LiftConfig(seed=5)), ValueError, "lift.seed=5 contradicts seed=43"),
        (dict(method="lora", lift=LiftConfig(rank=None, density=0.1)), ValueError, "density has no meaning for lora"),
        (dict(lift={"rank": 2}), TypeError, "lift must be a LiftConfig, got dict"),
        (dict(max_grad_norm=float("nan")), ValueError, "max_grad_norm must be a finite number > 0, or 0 or None"),
        (dict(loss="fused"), ValueError, "unknown --loss 'fused'; allowed: chunked, full, liger"),
    ],
)
def test_settings_that_contradict_the_run(kw, error, message):
    with pytest.raises(error, match=message):
        TrainArgs(model="m", data=["d"], output="o", **kw)


def test_method_and_seed_fill_in_the_lift_config():
    args = TrainArgs(model="m", data=["d"], output="o", method="principal-smallest",
                     lift=LiftConfig(rank=3, selector="principal-smallest", seed=7), seed=7)
    assert args.lift_config() == LiftConfig(rank=3, selector="principal-smallest", seed=7)
    assert TrainArgs(model="m", data=["d"], output="o", method="random").lift_config() == LiftConfig(selector="random",
                                                                                                    seed=43)


def test_run_record_is_flat_and_round_trips(base_dir, data_file, tmp_path):
    args = args_for(base_dir, data_file, tmp_path, method="magnitude", lift=LiftConfig(rank=None, density=0.25))
    record = args.run_record()
    assert (record["method"], record["density"], record["rank"], record["bias_correction"]) == ("magnitude", 0.25, None,
                                                                                              "matrix")
    assert "lift" not in record and "selector" not in record and record["seed"] == 7
    assert TrainArgs.from_flat(**record, progress=False) == args


def test_lift_flags_reach_the_optimizer(base_dir, data_file, tmp_path):
    common = ["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(tmp_path)]
    assert train_args_from(build_parser().parse_args(common)).lift.bias_correction == "matrix"
    args = train_args_from(build_parser().parse_args([*common, "--bias-correction", "entry", "--density", "0.1"]))
    assert args.lift == LiftConfig(rank=None, density=0.1, bias_correction="entry")

    one_step_cli_run(base_dir, data_file, tmp_path / "o", "--method", "magnitude", "--seed", "5",
                     "--bias-correction", "entry")
    config = load_delta(tmp_path / "o").meta["config"]
    assert (config["selector"], config["seed"], config["bias_correction"], config["rank"]) == ("magnitude", 5, "entry", 1)


# Every setting liftft recorded in run.json before TrainArgs held a LiftConfig, flat.
OLD_RECORD = {"model", "data", "output", "method", "rank", "density", "filter_rank", "update_interval", "target_modules",
              "lr", "epochs", "max_steps", "batch_size", "grad_accum", "max_seq_len", "warmup_ratio", "scheduler",
              "weight_decay", "max_grad_norm", "step_in_backward", "bf16", "gradient_checkpointing", "val_size",
              "template", "seed", "svd", "device"}


def test_run_recorded_by_an_older_liftft_resumes(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "o"
    common = one_step_cli_run(base_dir, data_file, out)
    recorded = json.loads((out / "run.json").read_text())["args"]
    assert set(recorded) >= OLD_RECORD | {"bias_correction", "exclude_modules", "master_weights", "sampled_grad",
                                          "fsdp"}
    rewrite_recorded_args(out, lambda name: name in OLD_RECORD)
    # The settings the older liftft did not record count as their defaults: bias correction per matrix.
    assert _cli(*common, "--resume", "--bias-correction", "entry") == 2
    assert "holds a different run (differs in: bias_correction)" in capsys.readouterr().err
    assert _cli(*common, "--resume") == 0


def test_output_dir_holding_something_else(base_dir, data_file, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    assert _cli("--model", base_dir, "--data", data_file, "--output", tmp_path, "--max-steps", "1") == 2
    assert f"output directory {tmp_path} is not empty and is not a previous liftft train run (no run.json)" in (
        capsys.readouterr().err)
    assert not (tmp_path / "run.json").exists()
