"""`liftft train --method gradient`: its selection against a brute-force top-k of |grad| by plain autograd over the
run's first micro-batches, the calibration order against the training loop's, resume, and refused settings."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_interrupted
from liftft import LiftConfig
from liftft import load_delta
from liftft.training.calibration import first_micro_batches
from liftft.training.checkpoint import latest_checkpoint
from liftft.cli import main
from liftft.data.batches import DataCollator, encode_dataset, load_records
from liftft.utils.hf import load_tokenizer
from liftft.training.loop import TrainingLoop
from liftft.engine.methods import setup_method
from liftft.engine.selection import budget
from liftft.training.train import TrainArgs

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

RANK = 2
BATCH, ACCUM, SEQ = 2, 2, 128


def _flags(base_dir, data_file, out, *extra):
    return ["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(out), "--method", "gradient",
            "--rank", str(RANK), "--batch-size", str(BATCH), "--grad-accum", str(ACCUM), "--max-seq-len", str(SEQ),
            "--seed", "5", "--no-progress", *map(str, extra)]


def _examples(base_dir, data_file):
    return encode_dataset(load_records([str(data_file)]), load_tokenizer(str(base_dir)), max_seq_len=SEQ)[0]


def _loop_order(base_dir, data_file, out, steps, as_rank=lambda: None) -> list[list[dict]]:
    """The micro-batches of the training loop's first ``steps`` steps, from TrainingLoop itself, built after
    ``as_rank()`` (which may make it see another world size and rank)."""
    args = TrainArgs(model=str(base_dir), data=[str(data_file)], output=str(out), method="random",
                     lift=LiftConfig(rank=RANK), max_steps=steps, epochs=None, batch_size=BATCH, grad_accum=ACCUM,
                     max_seq_len=SEQ, seed=5, progress=False)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    setup = setup_method(model, "random", args.lift_config())
    as_rank()
    loop = TrainingLoop(args, model, setup, _examples(base_dir, data_file), 0, torch.device("cpu"), False)
    return [micro for step in range(steps) for micro in loop._micro_batches(step)]


def _brute_force_scores(base_dir, micro_batches) -> dict[str, np.ndarray]:
    """Sum over the micro-batches of |d loss / d W| (the model's own mean loss), by torch.autograd.grad, in fp64."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    params = {n: p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    total = {n: np.zeros(tuple(p.shape)) for n, p in params.items()}
    model.train()
    for micro in micro_batches:
        grads = torch.autograd.grad(model(**DataCollator(0)(micro)).loss, list(params.values()))
        for n, g in zip(params, grads):
            total[n] += np.abs(g.double().numpy())
    return total


def test_cli_selects_the_brute_force_top_k_of_the_first_micro_batches(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    # 12 records in micro-batches of 2: 3 steps per epoch, so 8 micro-batches run into the second epoch.
    assert main(_flags(base_dir, data_file, out, "--calibration-batches", 8, "--max-steps", 2)) == 0
    assert "selecting by |gradient| summed over the first 8 micro-batches" in capsys.readouterr().out
    want = _brute_force_scores(base_dir, _loop_order(base_dir, data_file, tmp_path / "order", steps=4))
    delta = load_delta(out)
    assert set(delta.entries) == set(want)
    for name, scores in want.items():
        flat = scores.ravel()
        k = budget(scores.shape, rank=RANK)
        chosen = np.zeros(flat.size, dtype=bool)
        chosen[delta.entries[name][0].numpy()] = True
        assert chosen.sum() == k, name
        # The brute force's own top k, up to float32-versus-float64 rounding of entries tied at its k-th score.
        kth = np.sort(flat)[::-1][k - 1]
        assert flat[chosen].min() >= kth * (1 - 1e-5) and flat[~chosen].max() <= kth * (1 + 1e-5), name
        assert (chosen != (flat >= kth)).sum() <= 2, name
    recorded = json.loads((out / "run.json").read_text())["args"]
    assert recorded["calibration_batches"] == 8 and recorded["update_interval"] is None


@pytest.mark.parametrize("world, rank", [(1, 0), (2, 1)])
def test_calibration_order_is_the_training_loops(world, rank, base_dir, data_file, tmp_path, monkeypatch):
    from liftft.utils import distributed

    def as_rank():
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda: rank)

    # 12 records: with 2 ranks of 2, 3 micro-batches per epoch and a short last step.
    loop = _loop_order(base_dir, data_file, tmp_path, steps=5, as_rank=as_rank)
    ours = first_micro_batches(_examples(base_dir, data_file), len(loop), seed=5, batch_size=BATCH,
                               grad_accum=ACCUM, world=world, rank=rank)
    assert [[e["input_ids"] for e in micro] for micro in ours] == [[e["input_ids"] for e in micro] for micro in loop]


def test_resume_equals_uninterrupted_without_calibrating_again(base_dir, data_file, tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    common = ("--calibration-batches", 3, "--max-steps", 4, "--save-steps", 2, "--lr", "1e-2")
    assert main(_flags(base_dir, data_file, straight, *common)) == 0

    run_interrupted(monkeypatch, 3, lambda: main(_flags(base_dir, data_file, interrupted, *common)))
    assert latest_checkpoint(interrupted).name == "step-00000002"

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed gradient run computed calibration gradients")

    monkeypatch.setattr("liftft.engine.calibration.gradient_scores", no_calibration)
    assert main(_flags(base_dir, data_file, interrupted, *common, "--resume")) == 0
    a, b = load_delta(straight).entries, load_delta(interrupted).entries
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1]), name


def test_a_resumption_with_other_calibration_batches_is_refused(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_flags(base_dir, data_file, out, "--max-steps", 1, "--calibration-batches", 2)) == 0
    assert main(_flags(base_dir, data_file, out, "--max-steps", 1, "--calibration-batches", 3, "--resume")) == 2
    assert "differs in: calibration_batches" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("--update-interval", 5), "--method gradient selects once, from the calibration gradients, and never refreshes: "
                               "drop --update-interval 5"),
    (("--calibration-batches", 0), "--calibration-batches must be an integer >= 1, got 0"),
    (("--fsdp",), "--method gradient does not run under --fsdp"),
    (("--method", "lift", "--calibration-batches", 4), "--calibration-batches is for --method gradient, not --method lift"),
])
def test_refused_settings(extra, message, base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_flags(base_dir, data_file, out, "--max-steps", 1, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_update_interval_defaults(base_dir, data_file, tmp_path):
    from liftft.cli import build_parser
    from liftft.commands.train import train_args_from

    def parsed(*flags):
        return train_args_from(build_parser().parse_args(_flags(base_dir, data_file, tmp_path, *flags)))

    assert parsed().lift.update_interval is None and parsed().calibration_batches == 16
    assert parsed("--update-interval", 0).lift.update_interval is None
    assert parsed("--method", "lift").lift.update_interval == 400 and parsed("--method", "lift").calibration_batches is None
    assert parsed("--method", "lift", "--update-interval", 0).lift.update_interval is None


def test_a_rank_whose_share_of_the_calibration_batches_is_empty_adds_zero_scores(base_dir, data_file, tmp_path,
                                                                                 monkeypatch):
    """With too few records for every rank, a rank without examples takes part in the averaging with zeros instead
    of stopping alone (which would leave the others waiting in the collective until --dist-timeout)."""
    from liftft.utils import distributed
    from liftft.training.calibration import run_gradient_scores

    averaged = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "average_across_ranks", lambda tensors: averaged.append(tensors))
    args = TrainArgs.from_flat(model=str(base_dir), data=[str(data_file)], output=str(tmp_path), method="gradient",
                               rank=RANK, max_steps=1, epochs=None, batch_size=1, grad_accum=1,
                               calibration_batches=3, update_interval=None, progress=False)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    one_record = _examples(base_dir, data_file)[:1]  # each global micro-batch of 2 holds rank 0's example alone
    scores = run_gradient_scores(args, model, one_record, 0, torch.device("cpu"), False)
    targets = {n for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    assert scores.keys() == targets and all(not s.any() for s in scores.values())
    assert len(averaged) == 1 and len(averaged[0]) == len(targets)
