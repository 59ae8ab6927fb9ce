"""Bad inputs of `liftft eval` and of model and data loading: each refused in one line that names the culprit,
before the model's weights load, with nothing written."""

from __future__ import annotations

import json
import shutil
import tempfile

import datasets
import pytest
from conftest import math_records, tiny_llama
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from liftft import cli
from liftft.data.template import build_prompt, encode_prompt

# Records whose prompts are short enough for a model with few positions.
NUMBER_RECORDS = [{"instruction": f"What is {i} plus {i}?", "input": "", "answer": str(2 * i)} for i in range(3)]


@pytest.fixture
def weights_never_load(monkeypatch):
    """Fail the test if any model's weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.fixture
def sums(tmp_path):
    """A test file of NUMBER_RECORDS, the task "sums"."""
    path = tmp_path / "sums.json"
    path.write_text(json.dumps(NUMBER_RECORDS))
    return path


def run_eval(model_dir, output, task_file, *extra):
    return cli.main(
        ["eval", "--model", str(model_dir), "--output", str(output), "--task-file", str(task_file),
         "--kind", "number", "--max-new-tokens", "4", "--no-bf16", "--device", "cpu", *extra]
    )  # fmt: skip


def run_train(model_dir, data, output):
    return cli.main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(output),
                     "--max-steps", "1", "--rank", "1", "--filter-rank", "2", "--no-progress"])  # fmt: skip


def snapshot(root):
    """Every path under ``root`` with its bytes (None for a directory), to show that nothing was written."""
    return {str(path): None if path.is_dir() else path.read_bytes() for path in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- eval --output


def output_is_a_file(tmp_path):
    (tmp_path / "out").write_text("not a directory")
    return tmp_path / "out", "exists and is not a directory"


def output_under_a_file(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    return tmp_path / "file" / "out", "is not writable: Not a directory"


def predictions_is_a_file(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions").write_text("not a directory")
    return tmp_path / "out", "predictions exists and is not a directory"


def results_is_a_directory(tmp_path):
    (tmp_path / "out" / "results.json").mkdir(parents=True)
    return tmp_path / "out", "results.json is a directory"


def predictions_file_is_a_directory(tmp_path):
    (tmp_path / "out" / "predictions" / "sums.jsonl").mkdir(parents=True)
    return tmp_path / "out", "sums.jsonl is a directory"


@pytest.mark.parametrize(
    "make_output",
    [output_is_a_file, output_under_a_file, predictions_is_a_file, results_is_a_directory,
     predictions_file_is_a_directory],
)  # fmt: skip
def test_eval_output_that_cannot_be_written_fails_before_the_model_loads(
    make_output, base_dir, sums, tmp_path, weights_never_load, capsys
):
    output, defect = make_output(tmp_path)
    before = snapshot(tmp_path)
    assert run_eval(base_dir, output, sums) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"liftft eval: error: --output {output}") and defect in err
    assert len(err.splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_eval_output_in_a_directory_that_refuses_files(
    base_dir, sums, tmp_path, weights_never_load, monkeypatch, capsys
):
    # Permission bits do not bind root, who runs these tests in containers, so the refusal is simulated.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    output = tmp_path / "new" / "out"
    assert run_eval(base_dir, output, sums) == 2
    assert f"--output {output} is not writable: Permission denied" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_eval_output_check_leaves_nothing_behind_when_a_later_step_fails(base_dir, sums, tmp_path, monkeypatch, capsys):
    import liftft.utils.hf

    def broken_tokenizer(path):
        raise ValueError("tokenizer broken on purpose")

    monkeypatch.setattr(liftft.utils.hf, "load_tokenizer", broken_tokenizer)
    assert run_eval(base_dir, tmp_path / "new" / "out", sums) == 2
    assert "tokenizer broken on purpose" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- eval --max-new-tokens


def test_max_new_tokens_beyond_the_model_positions_is_capped(sums, tmp_path, tokenizer, monkeypatch, capsys):
    longest = max(len(encode_prompt(tokenizer, build_prompt(r))) for r in NUMBER_RECORDS)
    positions = longest + 5
    model_dir = tmp_path / "short"
    tiny_llama(max_position_embeddings=positions).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    asked = []
    generate = LlamaForCausalLM.generate

    def recording_generate(self, *args, **kwargs):
        asked.append(kwargs["max_new_tokens"])
        assert kwargs["max_new_tokens"] <= 5, "generation was asked for more tokens than the positions leave"
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "generate", recording_generate)
    out = tmp_path / "out"
    assert run_eval(model_dir, out, sums, "--max-new-tokens", "100000") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"liftft eval: warning: --max-new-tokens 100000 capped at 5 for sums: "
        f"the model has {positions} positions and the longest prompt takes {longest}"
    ]
    assert asked and set(asked) == {5}
    assert json.loads((out / "results.json").read_text())["tasks"]["sums"]["max_new_tokens"] == 5


# ---------------------------------------------------------------- damaged model directories


def truncated_weights(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "model.safetensors is damaged", "incomplete metadata"


def garbage_weights(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256))
    return "model.safetensors is damaged", "header too large"


def no_config(model_dir):
    (model_dir / "config.json").unlink()
    return "no config.json", "not a Hugging Face model directory"


def missing_shard(model_dir):
    (model_dir / "model.safetensors").unlink()
    tiny_llama().save_pretrained(model_dir, max_shard_size="60KB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (model_dir / shard).unlink()
    return shard, "listed in model.safetensors.index.json, does not exist"


DAMAGES = [truncated_weights, garbage_weights, no_config, missing_shard]
@pytest.mark.parametrize(
    "command, damage",
    [(command, damage) for command in ("eval", "train") for damage in DAMAGES],
)
def test_damaged_model_directory_is_named_before_the_weights_load(
    command, damage, base_dir, data_file, sums, tmp_path, weights_never_load, capsys
):
    model_dir = tmp_path / "model"
    shutil.copytree(base_dir, model_dir)
    culprit, defect = damage(model_dir)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "out"
    code = run_eval(model_dir, out, sums) if command == "eval" else run_train(model_dir, data_file, out)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"liftft {command}: error: model {model_dir}: {culprit}") and defect in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


# ---------------------------------------------------------------- datasets directories with a loading script


def script_named_after_its_directory(data_dir):
    (data_dir / f"{data_dir.name}.py").write_text("import datasets\n")
    return f"{data_dir.name}.py"


def script_next_to_data_files(data_dir):
    (data_dir / "foo.py").write_text("import datasets\n")
    (data_dir / "train.json").write_text(json.dumps(math_records(4)))
    return "foo.py"


def script_alone(data_dir):
    (data_dir / "foo.py").write_text("import datasets\n")
    return "foo.py"


@pytest.mark.parametrize("make_script", [script_named_after_its_directory, script_next_to_data_files, script_alone])
def test_dataset_directory_with_a_loading_script_is_refused(
    make_script, base_dir, tmp_path, weights_never_load, monkeypatch, capsys
):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    data_dir = tmp_path / "mydata"
    data_dir.mkdir()
    script = make_script(data_dir)
    out = tmp_path / "out"
    assert run_train(base_dir, data_dir, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"liftft train: error: dataset directory {data_dir} holds a loading script ({script})")
    assert "JSON Lines" in err and "save_to_disk" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()
