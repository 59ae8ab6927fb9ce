"""Every command and code block the README and the docs/ pages show runs as written, on a tiny model.

The placeholders (M, FILE, DIR, OUT, hub ids) are filled with tiny local stand-ins, and sizes are shrunk with flags
appended after the page's own. Commands that take minutes or several processes run in the test named for them
instead; `test_every_readme_command_is_run_here_or_named` keeps this list complete over README.md and docs/*.md.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import data_path
from liftft.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
HUB_ID = "meta-llama/Llama-3.2-1B"
TRAIN_SIZE = ["--rank", "2", "--filter-rank", "4", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
              "--max-seq-len", "128", "--save-steps", "1", "--no-progress"]
ELSEWHERE = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch --index-url https://download.pytorch.org/whl/cpu"
    ' && pip install -e ".[test]" && liftft demo':
        ".ci/run installs the same way; tests/test_demo.py runs liftft demo --quick",
    "liftft demo": "tests/test_demo.py runs liftft demo --quick",
    "python -m pytest": "the test suite itself",
    f"torchrun --nproc-per-node 8 -m liftft train --model {HUB_ID} --data math.json --output runs/lift":
        "tests/test_distributed.py::test_cli_under_torchrun_trains_writes_once_and_resumes_under_accelerate",
    f"accelerate launch --multi_gpu --num_processes 8 -m liftft train --model {HUB_ID} --data math.json --output runs/lift":
        "tests/test_distributed.py::test_cli_under_torchrun_trains_writes_once_and_resumes_under_accelerate",
    f"python examples/grpo_lift.py --model {HUB_ID} --output runs/grpo":
        "tests/test_integrations.py::test_grpo_example_trains_selected_entries_refreshes_and_saves runs it on a tiny model",
    "lm_eval --model hf --model_args pretrained=OUT --tasks gsm8k":
        "not run: lm-eval is not a test dependency and gsm8k comes from the hub; OUT is the merged dir that "
        "test_merge_and_export_shira writes and tests/test_merge.py loads with AutoModelForCausalLM, as lm-eval's hf model does",
    "lm_eval --model hf --model_args pretrained=OUT --include_path $(liftft lm-eval-tasks --data-dir LLM-Adapters/dataset) "
    "--tasks liftft_math": "tests/test_lm_eval_tasks.py::test_readme_command_matches_liftft_eval runs it on a tiny "
        "merged model (--limit 2) and compares it with liftft eval; skipped without lm-eval, not a test dependency",
    "liftft lm-eval-tasks --data-dir DIR": "tests/test_lm_eval_tasks.py::test_cli_prints_only_the_pack_directory",
    "torchrun --nproc-per-node 8 -m liftft train --fsdp --model meta-llama/Meta-Llama-3-8B --data math.json "
    "--output runs/lift-8b": "tests/test_fsdp_train.py::test_two_rank_fsdp_equals_one_process_and_resumes_bit_identically",
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id lift-8b -m liftft "
    "train --fsdp --model meta-llama/Meta-Llama-3-8B --data math.json --output DIR":
        "tests/test_fsdp_train.py::test_two_rank_fsdp_equals_one_process_and_resumes_bit_identically",
    "tensorboard --logdir DIR/tensorboard":
        "not run: it serves a web page; test_config_file_and_watching reads the event files it would show",
    "liftft train --model M --data FILE --output DIR --load-in-4bit":
        "tests/test_readme.py::test_the_qlift_page runs it with docs/qlift.md's --bf16 --gradient-checkpointing",
    "liftft eval --model M --delta DIR":
        "tests/test_qlift_train.py::test_eval_of_a_qlift_delta_equals_eval_of_the_merged_16bit_model",
    # Commands that docs/ pages name in their prose, each run by the test named for it.
    "liftft analyze filter-rank --model demo":
        "tests/test_filter_rank.py::test_demo_model_takes_the_demos_base_tasks_and_settings runs it on a tiny demo",
    "liftft train --fsdp": "tests/test_fsdp_train.py::test_one_process_fsdp_equals_the_unsharded_run",
    "liftft train --data": "the flag docs/reproduce.md names; liftft train --model M --data FILE ... runs here",
    "liftft train --method gradient [--calibration-batches N]":
        "tests/test_gradient_train.py::test_cli_selects_the_brute_force_top_k_of_the_first_micro_batches",
}
RUN_HERE = [
    "liftft train --step-in-backward --grad-accum 1 --max-grad-norm 0",
    "liftft train --model M --data FILE --output DIR --method lift",
    "liftft eval --model M [--delta DIR | --adapter DIR] --data-dir LLM-Adapters/dataset --output DIR --tasks math",
    "liftft merge --model M --delta DIR --output OUT",
    "liftft export-shira --delta DIR --output OUT",
    "liftft analyze perturb --model M --data FILE --output DIR",
    "liftft analyze spectrum --model M --tuned DIR --output OUT",
    "liftft analyze overlap --model M --output OUT",
    "liftft bench",
    "liftft estimate --model-config llama-8b --method lift --gpus 8 --gradient-checkpointing",
    "liftft train --config run.yaml --max-steps 200 --val-size 100 --eval-steps 50 --logging-steps 10",
    "liftft reproduce math --model M --data FILE --output DIR",
    "liftft analyze filter-rank --model M --data FILE --test FILE --output DIR",
    # docs/qlift.md
    "liftft train --model M --data FILE --output DIR --load-in-4bit --bf16 --gradient-checkpointing",
    "liftft train --model M --data FILE --output DIR --load-in-4bit --bf16 --gradient-checkpointing --method lora",
    "liftft merge --model M --delta DIR --output OUT --original-weights",
    "liftft estimate --model-config llama-8b --method lift --gradient-checkpointing --load-in-4bit",
    "liftft bench --model-config h256 --load-in-4bit --rank 16",
]
QLIFT_COMMANDS = RUN_HERE[-5:]


def readme_commands() -> set[str]:
    """Every shell line in the bash blocks of the README and the docs/ pages, and every `liftft ...` they show in a
    command table or with flags in their text."""
    commands = set()
    for page in PAGES:
        text = page.read_text()
        commands |= {line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                     for line in block.splitlines() if line.strip()}
        commands |= set(re.findall(r"^\| `(liftft [^`]*)`", text, re.M))
        commands |= {span for span in re.findall(r"`(liftft [a-z-]+ [^`]*)`", text) if "--" in span}
    return {command.replace("\\|", "|") for command in commands if command != "liftft COMMAND --help"}


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page``."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_file_and_heading():
    """The README's links into docs/, and the pages' links to each other and to the code, resolve."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            linked = page.parent / path if path else page
            assert linked.exists(), f"{page.name} links to {target}"
            assert not anchor or anchor in anchors(linked), f"{page.name} links to {target}"


def test_every_readme_command_is_run_here_or_named():
    assert readme_commands() == set(ELSEWHERE) | set(RUN_HERE)


@pytest.fixture(scope="module")
def runs(base_dir, data_file, tmp_path_factory):
    """A LIFT run and a LoRA run of the README's train command on the tiny model."""
    root = tmp_path_factory.mktemp("readme")
    for method in ("lift", "lora"):
        assert cli("liftft train --model M --data FILE --output DIR --method lift", base_dir, data_file,
                   root / method, *TRAIN_SIZE, "--method", method) == 0
    return root


def cli(command: str, model: Path, data: Path, directory: Path, *extra, out: Path | None = None) -> int:
    """Run a README command through `liftft`'s main with its placeholders filled in and ``extra`` flags after."""
    filled = {"M": str(model), "FILE": str(data), "DIR": str(directory), "OUT": str(out or directory)}
    argv = [filled.get(word, word) for word in shlex.split(command)][1:]
    return main([*argv, *map(str, extra)])


def test_train_and_step_in_backward(runs, base_dir, data_file, tmp_path):
    assert (runs / "lift" / "delta.safetensors").is_file() and (runs / "lora" / "adapter").is_dir()
    assert cli(RUN_HERE[0], base_dir, data_file, tmp_path, "--model", base_dir, "--data", data_file, "--output",
               tmp_path / "sib", *TRAIN_SIZE) == 0


@pytest.mark.parametrize("source", ["--delta DIR", "--adapter DIR"])
def test_eval_with_a_delta_or_an_adapter(source, runs, base_dir, data_file, tmp_path):
    template = RUN_HERE[2].replace("[--delta DIR | --adapter DIR]", source)
    template = template.replace("LLM-Adapters/dataset", str(data_path("test")))
    directory = runs / "lift" if source == "--delta DIR" else runs / "lora" / "adapter"
    command = template.replace("--output DIR", f"--output {tmp_path / 'eval'}")
    assert cli(command, base_dir, data_file, directory, "--limit", "1", "--max-new-tokens", "4", "--no-progress") == 0
    assert (tmp_path / "eval" / "results.json").is_file()


def test_merge_and_export_shira(runs, base_dir, data_file, tmp_path):
    assert cli(RUN_HERE[3], base_dir, data_file, runs / "lift", out=tmp_path / "merged") == 0
    assert cli(RUN_HERE[4], base_dir, data_file, runs / "lift", out=tmp_path / "shira") == 0
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "shira" / "adapter_config.json").is_file()


def test_the_three_analyses(runs, base_dir, data_file, tmp_path):
    assert cli(RUN_HERE[5], base_dir, data_file, tmp_path / "perturb", "--limit", "2", "--no-progress") == 0
    assert cli(RUN_HERE[6], base_dir, data_file, runs / "lift", out=tmp_path / "spectrum") == 0
    assert cli(RUN_HERE[7], base_dir, data_file, tmp_path, out=tmp_path / "overlap") == 0
    assert all((tmp_path / name / f"{name}.json").is_file() for name in ("perturb", "spectrum", "overlap"))


def test_filter_rank(base_dir, data_file, tmp_path):
    command = next(c for c in RUN_HERE if c.startswith("liftft analyze filter-rank"))
    assert cli(command, base_dir, data_file, tmp_path, "--ranks", "2,4", "--rank", "2", "--max-steps", "1",
               "--batch-size", "2", "--max-seq-len", "128", "--limit", "1", "--max-new-tokens", "4", "--no-progress") == 0
    assert [run["filter_rank"] for run in json.loads((tmp_path / "filter_rank.json").read_text())["runs"]] == [2, 4]


def test_bench(tmp_path):
    assert main(["bench", "--steps", "1", "--warmup", "0", "--seq-len", "16", "--batch-size", "1", "--methods", "lift",
                 "--device", "cpu", "--output", str(tmp_path / "bench.json")]) == 0


def test_estimate(capsys):
    # The meta device makes the 8B shape as cheap to plan as a tiny one, so the command runs as written.
    assert cli(RUN_HERE[9], Path("M"), Path("FILE"), Path("DIR")) == 0
    assert "fits an 80 GB GPU" in capsys.readouterr().out


def test_reproduce(base_dir, data_file, tmp_path):
    command = next(c for c in RUN_HERE if c.startswith("liftft reproduce"))
    smoke = ["--data-dir", data_path("test"), "--methods", "lift", "--tasks", "AddSub", "--max-steps", "1", "--limit",
             "1", "--max-new-tokens", "4", "--batch-size", "2", "--grad-accum", "1", "--val-size", "2", *TRAIN_SIZE[:4]]
    assert cli(command, base_dir, data_file, tmp_path / "reproduce", *smoke, "--max-seq-len", "128", "--no-progress") == 0
    assert "| task | LIFT (run) |" in (tmp_path / "reproduce" / "results.md").read_text()


def test_config_file_and_watching(base_dir, data_file, tmp_path, monkeypatch):
    """docs/running.md's run.yaml and the command that reads it; TensorBoard's event files read back."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    section = (DOCS / "running.md").read_text()
    filled = {"M": base_dir, "FILE": data_file, "DIR": tmp_path / "run"}
    config = re.sub(r"\b(M|FILE|DIR)\b", lambda m: str(filled[m.group(1)]),
                    re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    (tmp_path / "run.yaml").write_text(config)
    monkeypatch.chdir(tmp_path)
    command = next(c for c in RUN_HERE if "--config run.yaml" in c)
    assert cli(command, base_dir, data_file, tmp_path / "run", *TRAIN_SIZE, "--val-size", "2", "--eval-steps", "1") == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (run["args"]["lr"], run["args"]["grad_accum"], run["options"]["report_to"]) == (2e-4, 1, "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/loss")] == [1, 2] and [e.step for e in events.Scalars("train/loss")] == [2]


def test_the_python_api_block(base_dir, data_file, tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1).replace(HUB_ID, str(base_dir))
    monkeypatch.chdir(tmp_path)
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    scope = {"loader": [{"input_ids": ids, "labels": ids}] * 2}
    exec(code, scope)  # noqa: S102 - the README's own example
    for (name, trained), rebuilt in zip(scope["model"].named_parameters(), scope["base_model"].parameters()):
        assert torch.equal(trained, rebuilt), name


def test_the_trainer_and_hub_blocks(base_dir, tmp_path, monkeypatch, capsys):
    """docs/integrations.md's Trainer and hub blocks, on the tiny model: two steps, and uploads recorded instead of
    made."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    from liftft.data.batches import DataCollator
    from liftft.engine.selection import budget
    from liftft.engine.targets import find_targets

    section = (DOCS / "integrations.md").read_text()
    trainer_block, hub_block = re.findall(r"```python\n(.*?)```", section, re.S)
    trainer_block = trainer_block.replace('TrainingArguments("runs/trainer", ', 'TrainingArguments("runs/trainer", '
                                          'max_steps=2, per_device_train_batch_size=2, report_to=[], use_cpu=True, ')
    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: uploads.append((repo_id, kw["private"])))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(sorted(kw["allow_patterns"])))
    monkeypatch.chdir(tmp_path)
    ids = torch.randint(3, 512, (4, 10), generator=torch.Generator().manual_seed(0)).tolist()
    scope = {"dataset": [{"input_ids": row, "labels": row} for row in ids], "collator": DataCollator(0)}
    exec(trainer_block.replace(HUB_ID, str(base_dir)), scope)  # noqa: S102 - the page's own example
    trained = sum(budget(tuple(p.shape), rank=128) for p in find_targets(scope["model"], "all-linear").values())
    assert f"trainable params: {trained:,d} || all params:" in capsys.readouterr().out
    exec(hub_block, scope)  # noqa: S102
    assert uploads == [("you/llama-3.2-1b-lift-math", True), ["README.md", "delta.safetensors", "liftft.json"]]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    for (name, restored), original in zip(scope["model"].named_parameters(), base.parameters()):
        assert torch.equal(restored, original), name


def test_the_qlift_page(base_dir, data_file, tmp_path, capsys):
    """docs/qlift.md's commands: QLIFT and QLoRA on a 4-bit base, the merge onto the original weights, the
    estimate as written, and the bench shrunk to a step."""
    qlift, qlora, merge, estimate, bench = QLIFT_COMMANDS
    assert cli(qlift, base_dir, data_file, tmp_path / "qlift", *TRAIN_SIZE) == 0
    assert cli(qlora, base_dir, data_file, tmp_path / "qlora", *TRAIN_SIZE) == 0
    assert json.loads((tmp_path / "qlift" / "liftft.json").read_text())["quantization"]["load_in_4bit"]
    assert (tmp_path / "qlora" / "adapter").is_dir()
    assert cli(merge, base_dir, data_file, tmp_path / "qlift", out=tmp_path / "merged") == 0
    assert json.loads((tmp_path / "merged" / "liftft_merge.json").read_text())["onto"] == "original 16-bit weights"
    capsys.readouterr()
    assert cli(estimate, Path("M"), Path("FILE"), Path("DIR")) == 0
    assert "4-bit base" in capsys.readouterr().out
    assert cli(bench, Path("M"), Path("FILE"), Path("DIR"), "--steps", "1", "--warmup", "0", "--seq-len", "16",
               "--batch-size", "1", "--methods", "lora,lift", "--device", "cpu",
               "--output", tmp_path / "bench.json") == 0
    assert set(json.loads((tmp_path / "bench.json").read_text())["methods"]) == {"lora", "lift"}
