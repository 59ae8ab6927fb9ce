"""`liftft eval`: results and predictions on disk, reruns, deltas and adapters, custom files, bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import data_path, tiny_llama
from eval_data import shipped_records

from liftft import cli
from liftft.eval import TASKS, candidates
from liftft.data.template import build_prompt, encode_prompt


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny"
    tiny_llama(max_position_embeddings=4096).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _eval(model_dir, output, *extra):
    return cli.main(
        ["eval", "--model", str(model_dir), "--output", str(output), "--data-dir", str(data_path("test")),
         "--max-new-tokens", "6", "--batch-size", "4", "--no-bf16", "--device", "cpu", *extra]
    )  # fmt: skip


@pytest.mark.parametrize("scoring", ["generate", "loglik"])
def test_eval_end_to_end(model_dir, tmp_path, tokenizer, scoring, capsys):
    out = tmp_path / "out"
    tasks = ["gsm8k", "AQuA", "boolq", "piqa"]
    assert _eval(model_dir, out, "--tasks", ",".join(tasks), "--limit", "5", "--scoring", scoring) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == set(tasks)
    for name in tasks:
        summary = results["tasks"][name]
        lines = (out / "predictions" / f"{name}.jsonl").read_text().splitlines()
        assert summary["count"] == len(lines) == 5 and summary["errors"] == 0
        generated = scoring == "generate" or name == "gsm8k"
        assert summary["scoring"] == ("generate" if generated else "loglik")
        first = json.loads(lines[0])
        assert first["answer"] == shipped_records(name)[0]["answer"]
        if generated:
            prompt = encode_prompt(tokenizer, build_prompt(shipped_records(name)[0]))
            model = tiny_llama(max_position_embeddings=4096)
            new = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
            new = new[0, len(prompt) :].tolist()
            assert first["generation"] == tokenizer.decode(new[: new.index(2)] if 2 in new else new, skip_special_tokens=True)
            assert set(first["extracted"]) == {"reference", "strict"}
        else:
            assert set(first["candidates"]) == set(candidates(TASKS[name.lower()], shipped_records(name)[0]))
    assert set(results["suites"]) == {"math", "commonsense"}
    assert results["suites"]["math"]["macro_accuracy"] == pytest.approx(
        (results["tasks"]["gsm8k"]["accuracy"] + results["tasks"]["AQuA"]["accuracy"]) / 2
    )
    assert "gsm8k" in capsys.readouterr().out

    # A rerun with the same settings skips every task.
    assert _eval(model_dir, out, "--tasks", ",".join(tasks), "--limit", "5", "--scoring", scoring) == 0
    assert capsys.readouterr().out.count("already done") == 4


def test_delta_is_applied_to_the_base_model(model_dir, tmp_path, monkeypatch):
    import liftft.deltas.delta

    applied = []

    def silence_model(model, path, scale=1.0):
        # Zero hidden states make every logit 0, so greedy decoding emits <pad> (id 0) forever.
        applied.append(path)
        model.model.norm.weight.data.zero_()
        return model

    monkeypatch.setattr(liftft.deltas.delta, "apply_delta", silence_model)
    class Read(str):  # the "delta" read is its path, which apply_delta records; of a 16-bit base (no quantization)
        meta = {}

    monkeypatch.setattr(liftft.deltas.delta, "load_delta", Read)
    delta_dir = tmp_path / "delta"
    delta_dir.mkdir()
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--tasks", "gsm8k", "--limit", "2", "--delta", str(delta_dir)) == 0
    assert applied == [str(delta_dir)]
    for line in (out / "predictions" / "gsm8k.jsonl").read_text().splitlines():
        prediction = json.loads(line)
        assert prediction["generation"] == "" and prediction["truncated"] is True


def test_peft_adapter_is_loaded_on_the_base_model(model_dir, tmp_path, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(1)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(tiny_llama(max_position_embeddings=4096), lora).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--tasks", "gsm8k", "--limit", "1", "--adapter", str(tmp_path / "adapter")) == 0
    generation = json.loads((out / "predictions" / "gsm8k.jsonl").read_text())["generation"]

    peft_model = PeftModel.from_pretrained(tiny_llama(max_position_embeddings=4096), tmp_path / "adapter")
    prompt = encode_prompt(tokenizer, build_prompt(shipped_records("gsm8k")[0]))
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        adapted = peft_model.generate(input_ids=torch.tensor([prompt]), **greedy)[0, len(prompt) :].tolist()
        base = tiny_llama(max_position_embeddings=4096).generate(torch.tensor([prompt]), **greedy)
    assert base[0, len(prompt) :].tolist() != adapted, "precondition: the adapter changes the generation"
    cut = adapted[: adapted.index(2)] if 2 in adapted else adapted
    assert generation == tokenizer.decode(cut, skip_special_tokens=True)


def test_missing_tasks_are_reported_and_the_rest_still_run(model_dir, tmp_path):
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--tasks", "hellaswag,SingleEq,ARC-Easy", "--limit", "2") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["missing"] == ["ARC-Easy", "hellaswag"]
    assert list(results["tasks"]) == ["SingleEq"]


def test_other_settings_in_the_output_need_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--tasks", "boolq", "--limit", "2", "--scoring", "loglik") == 0
    assert _eval(model_dir, out, "--tasks", "boolq", "--limit", "3", "--scoring", "loglik") == 2
    assert "limit" in capsys.readouterr().err
    assert _eval(model_dir, out, "--tasks", "boolq", "--limit", "3", "--scoring", "loglik", "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["tasks"]["boolq"]["count"] == 3


def test_task_file_with_kind(model_dir, tmp_path):
    records = [{"instruction": f"Is {i} even? Answer format: yes/no", "input": "", "answer": "yes" if i % 2 == 0 else "no"}
               for i in range(3)]  # fmt: skip
    path = tmp_path / "parity.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "out"
    assert _eval(model_dir, out, "--task-file", str(path), "--kind", "choice", "--scoring", "loglik") == 0
    summary = json.loads((out / "results.json").read_text())["tasks"]["parity"]
    assert summary["count"] == 3 and summary["suite"] == "custom"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "gsm9k"], "unknown task 'gsm9k'.*known.*gsm8k"),
        (["--tasks", "gsm8k", "--num-beams", "0"], "--num-beams must be at least 1"),
        (["--task-file", "x.json"], "--task-file and --kind go together"),
        (["--tasks", "gsm8k", "--delta", "/no/such/delta"], "--delta directory '/no/such/delta'"),
    ],
)
def test_bad_flags_fail_early(model_dir, tmp_path, args, message, capsys):
    assert _eval(model_dir, tmp_path / "out", *args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_missing_model_fails_early(tmp_path, capsys):
    assert _eval(tmp_path / "no-model", tmp_path / "out", "--tasks", "gsm8k") == 2
    assert "no-model" in capsys.readouterr().err


def test_malformed_test_file_names_the_file_and_record(model_dir, tmp_path, capsys):
    records = shipped_records("gsm8k")[:5]
    del records[3]["answer"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(records))
    assert _eval(model_dir, tmp_path / "out", "--task-file", str(path), "--kind", "number") == 2
    err = capsys.readouterr().err
    assert "broken.json: record 3" in err and "answer" in err
    records[3]["answer"] = "seven"
    path.write_text(json.dumps(records))
    assert _eval(model_dir, tmp_path / "out", "--task-file", str(path), "--kind", "number") == 2
    assert "record 3: answer 'seven' is not a number" in capsys.readouterr().err
