"""`liftft lm-eval-tasks`: the pack on disk, its hooks, lm-eval running it (scripted answers and a tiny merged model,
the latter compared with `liftft eval` example by example), and bad input."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import data_path, train_and_save
from eval_data import shipped_records

from liftft import cli
from liftft.eval import SUITES
from liftft.lm_eval_tasks import ExtractAnswer, write_task_pack
from liftft.lm_eval_tasks.hooks import process_choice, process_letter, process_number

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Response:\n"
)
INTEGRATIONS_DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
AQUA_CHOICES = " Answer Choices: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5"
# Hand-written records and the generation a scripted model gives for each, with what each extractor must read.
SCRIPT = {
    "gsm8k": [
        ("How many apples in all?", "1234", "Total: 1,234 apples. The answer is 1,234.", 1234.0, 1234.0),
        ("What is 49 - 34?", "15", "49 - 34 = 15. The answer is 15. Check: 15 + 34 = 49", 15.0, 49.0),
        ("How many birds?", "7", "I do not know.", None, None),
    ],
    "AQuA": [
        ("Which is three?" + AQUA_CHOICES, "C", "Answer: (C)", "C", "A"),
        ("Which is two?" + AQUA_CHOICES, "B", "The answer is (B).", "B", "B"),
    ],
    "boolq": [
        ("Is water wet? Answer format: true/false", "true", "the correct answer is true", "true", "true"),
        ("Is fire cold? Answer format: true/false", "false", "the correct answer is true", "true", "true"),
    ],
    "piqa": [
        ("Open a jar. Solution1: hammer it Solution2: twist the lid", "solution2", "Solution2 is right",
         "solution2", "solution2"),
    ],
}  # fmt: skip
# Accuracy by extractor, counted by hand from SCRIPT; groups average their tasks unweighted.
ACCURACY = {
    "liftft_gsm8k": {"strict": 2 / 3, "reference": 1 / 3},
    "liftft_aqua": {"strict": 1.0, "reference": 0.5},
    "liftft_boolq": {"strict": 0.5, "reference": 0.5},
    "liftft_piqa": {"strict": 1.0, "reference": 1.0},
    "liftft_math": {"strict": 5 / 6, "reference": 5 / 12},
    "liftft_commonsense": {"strict": 0.75, "reference": 0.75},
}
PROCESS = {"gsm8k": process_number, "AQuA": process_letter, "boolq": process_choice, "piqa": process_choice}


@pytest.fixture
def scripted_data(tmp_path):
    """A data dir with SCRIPT's records, one folder per task; AQuA's folder in lower case, as any case is found."""
    root = tmp_path / "data"
    for name, rows in SCRIPT.items():
        folder = root / (name.lower() if name == "AQuA" else name)
        folder.mkdir(parents=True)
        records = [{"instruction": text, "input": "", "answer": gold} for text, gold, *_ in rows]
        (folder / "test.json").write_text(json.dumps(records))
    return root


def test_hooks_extract_and_score_as_liftft_eval():
    for name, rows in SCRIPT.items():
        docs = [{"instruction": text, "input": "", "answer": gold} for text, gold, *_ in rows]
        resps = [[generation] for _, _, generation, _, _ in rows]
        for extractor, column in (("strict", 3), ("reference", 4)):
            answers = ExtractAnswer(name, extractor).apply(resps, docs)
            assert answers == [row[column] for row in rows], (name, extractor)
            accuracy = sum(PROCESS[name](doc, [a])["acc"] for doc, a in zip(docs, answers)) / len(docs)
            assert accuracy == pytest.approx(ACCURACY[f"liftft_{name.lower()}"][extractor])


def test_pack_on_disk(scripted_data, tmp_path):
    with pytest.warns(UserWarning, match="SVAMP.*ARC-Easy.*hellaswag"):
        pack = write_task_pack(scripted_data, tmp_path / "pack")
    manifest = json.loads((pack / "liftft_tasks.json").read_text())
    assert manifest["tasks"] == {
        "liftft_gsm8k": str(scripted_data / "gsm8k" / "test.json"),
        "liftft_aqua": str(scripted_data / "aqua" / "test.json"),
        "liftft_boolq": str(scripted_data / "boolq" / "test.json"),
        "liftft_piqa": str(scripted_data / "piqa" / "test.json"),
    }
    assert manifest["groups"] == {"liftft_math": ["liftft_gsm8k", "liftft_aqua"],
                                  "liftft_commonsense": ["liftft_boolq", "liftft_piqa"]}
    assert len(manifest["missing"]) == len(SUITES["math"]) + len(SUITES["commonsense"]) - 4
    assert sorted(p.name for p in pack.iterdir()) == sorted(
        [f"{name}.yaml" for name in [*manifest["tasks"], *manifest["groups"]]] + ["liftft_tasks.json", "utils.py"])
    aqua = (pack / "liftft_aqua.yaml").read_text()
    assert f'test: "{scripted_data / "aqua" / "test.json"}"' in aqua and 'task: "AQuA"' in aqua
    assert "process_results: !function utils.process_letter" in aqua


def test_lm_eval_scores_scripted_answers(scripted_data, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    generations = {ALPACA.format(text): generation for rows in SCRIPT.values() for text, _, generation, *_ in rows}
    asked = []

    class Scripted(LM):
        def generate_until(self, requests, disable_tqdm=False):
            asked.extend(request.args for request in requests)
            return [generations[request.args[0]] for request in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        loglikelihood_rolling = loglikelihood

    with pytest.warns(UserWarning, match="left out"):
        pack = write_task_pack(scripted_data, tmp_path / "pack")
    out = lm_eval.simple_evaluate(model=Scripted(), tasks=["liftft_math", "liftft_commonsense"],
                                  task_manager=TaskManager(include_path=str(pack), include_defaults=False),
                                  log_samples=True)
    assert len(asked) == sum(map(len, SCRIPT.values()))
    assert all(kwargs == {"until": [], "max_gen_toks": 256, "do_sample": False} for _, kwargs in asked)
    for name, expected in ACCURACY.items():
        for extractor, accuracy in expected.items():
            assert out["results"][name][f"acc,{extractor}"] == pytest.approx(accuracy), (name, extractor)
    for sample in out["samples"]["liftft_gsm8k"]:
        column = 3 if sample["filter"] == "strict" else 4
        assert sample["filtered_resps"] == [SCRIPT["gsm8k"][sample["doc_id"]][column]]


def lm_eval_command() -> str:
    """docs/integrations.md's lm_eval line that runs liftft's pack."""
    return next(line for line in INTEGRATIONS_DOC.read_text().splitlines() if "$(liftft lm-eval-tasks" in line)


def test_readme_command_matches_liftft_eval(tokenizer, tmp_path):
    """docs/integrations.md's command on a tiny merged model gives, example by example, what `liftft eval` gives."""
    pytest.importorskip("lm_eval")
    train_and_save(tmp_path, tokenizer)
    merged, data = tmp_path / "merged", data_path("test")
    assert cli.main(["merge", "--model", str(tmp_path / "base"), "--delta", str(tmp_path / "delta"),
                     "--output", str(merged)]) == 0
    command = lm_eval_command().replace("pretrained=OUT", f"pretrained={merged}")
    command = command.replace("LLM-Adapters/dataset", shlex.quote(str(data)))
    extra = "--limit 2 --gen_kwargs max_gen_toks=8 --device cpu --batch_size 1 --log_samples --output_path"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIFTFT_CACHE": str(tmp_path / "cache"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # liftft and lm_eval of this venv
    run = subprocess.run(["bash", "-c", f"{command} {extra} {tmp_path / 'lm_eval'}"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert cli.main(["eval", "--model", str(merged), "--data-dir", str(data), "--tasks", "math", "--limit", "2",
                     "--max-new-tokens", "8", "--batch-size", "1", "--device", "cpu", "--no-bf16",
                     "--output", str(tmp_path / "liftft_eval"), "--no-progress"]) == 0
    ours = json.loads((tmp_path / "liftft_eval" / "results.json").read_text())
    theirs = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())
    compared = 0
    for name in SUITES["math"]:
        task = f"liftft_{name.lower()}"
        predictions = [json.loads(line) for line in
                       (tmp_path / "liftft_eval" / "predictions" / f"{name}.jsonl").read_text().splitlines()]
        samples = [json.loads(line) for line in next((tmp_path / "lm_eval").rglob(f"samples_{task}_*.jsonl")).open()]
        assert len(samples) == 2 * len(predictions) == 4
        for sample in samples:
            prediction, extractor = predictions[sample["doc_id"]], sample["filter"]
            record = shipped_records(name)[sample["doc_id"]]
            assert sample["arguments"]["gen_args_0"]["arg_0"] == ALPACA.format(record["instruction"].strip())
            assert sample["resps"] == [[prediction["generation"]]]
            assert sample["filtered_resps"] == [str(prediction["extracted"][extractor])]  # logged as text
            assert sample["acc"] == float(prediction["correct_by_extractor"][extractor])
            compared += prediction["extracted"][extractor] is not None
        for extractor in ("strict", "reference"):
            accuracy = ours["tasks"][name]["accuracy_by_extractor"][extractor]
            assert theirs["results"][task][f"acc,{extractor}"] == pytest.approx(accuracy)
    assert compared > 0, "no answer was extracted: the comparison saw only empty answers"
    assert theirs["results"]["liftft_math"]["acc,strict"] == pytest.approx(ours["suites"]["math"]["macro_accuracy"])


def test_cli_prints_only_the_pack_directory(scripted_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIFTFT_DATA_DIR", str(scripted_data))
    monkeypatch.setenv("LIFTFT_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning):
        assert cli.main(["lm-eval-tasks"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed.parent == tmp_path / "cache" / "lm-eval-tasks" and (printed / "liftft_gsm8k.yaml").is_file()
    inode = printed.stat().st_ino
    with pytest.warns(UserWarning):  # the same pack again: left as it is, not even replaced
        assert cli.main(["lm-eval-tasks", "--data-dir", str(scripted_data), "--output", str(printed)]) == 0
    assert capsys.readouterr().out == f"{printed}\n" and printed.stat().st_ino == inode
    (scripted_data / "SVAMP").mkdir()
    (scripted_data / "SVAMP" / "test.json").write_text(json.dumps([{"instruction": "How many?", "answer": "3"}]))
    with pytest.warns(UserWarning):  # a different one replaces the earlier pack
        assert cli.main(["lm-eval-tasks", "--data-dir", str(scripted_data), "--output", str(printed)]) == 0
    assert capsys.readouterr().out == f"{printed}\n" and (printed / "liftft_svamp.yaml").is_file()


def test_bad_input_is_named_and_nothing_is_written(scripted_data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LIFTFT_DATA_DIR", raising=False)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    (scripted_data / "AddSub").mkdir()
    (scripted_data / "AddSub" / "test.json").write_text(json.dumps([{"instruction": "How many?", "answer": "many"}]))
    cases = [
        ([], "no data dir: pass --data-dir"),
        (["--data-dir", str(tmp_path / "absent")], "does not exist"),
        (["--data-dir", str(tmp_path / "notes")], "holds no <task>/test.json"),
        (["--data-dir", str(scripted_data), "--output", str(foreign)], "not a previous liftft lm-eval-tasks"),
        (["--data-dir", str(scripted_data), "--output", str(tmp_path / "pack")], "AddSub/test.json: record 0: answer"),
    ]
    for argv, message in cases:
        assert cli.main(["lm-eval-tasks", *argv]) == 2
        assert message in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"] and not (tmp_path / "pack").exists()
