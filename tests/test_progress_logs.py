"""Progress in a log: where stderr is not a terminal, one plain line every tenth of the work or every 30 seconds,
with the step, the loss, tokens/s and the ETA; a terminal keeps tqdm's bar; --no-progress silences every bar, the
evaluations run in-process included."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

from conftest import tiny_llama

from liftft import cli
from liftft.eval import evaluate_task, get_task
from liftft.utils.progress import LineProgress, progress_bar, progress_shown


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_plain_line_every_tenth_with_the_count_postfix_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=200, desc="train lift", unit="step", file=out, clock=clock)
    for step in range(1, 201):
        clock.now += 0.5
        bar.set_postfix(loss=f"{1 / step:.4f}", tokens_per_s="1,234")
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10
    assert lines[0] == "train lift: 20/200 steps (10%), loss=0.0500, tokens_per_s=1,234 | 2.00 steps/s, elapsed 0:10, ETA 1:30"
    assert lines[-1] == "train lift: 200/200 steps (100%), loss=0.0050, tokens_per_s=1,234 | 2.00 steps/s, elapsed 1:40, ETA 0:00"
    assert [int(re.match(r"train lift: (\d+)/200", line)[1]) for line in lines] == list(range(20, 201, 20))


def test_a_slow_stretch_gets_a_line_every_30_seconds_and_a_resumed_run_counts_from_where_it_resumed():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(total=1000, initial=500, desc="train", unit="step", file=out, clock=clock)
    for _ in range(10):
        clock.now += 11
        bar.update(1)
    lines = out.getvalue().splitlines()
    # 33 s after the start (step 503) and 33 s after that (506), then 509; nothing crossed 60%.
    assert [line.split(" | ")[0] for line in lines] == [f"train: {n}/1000 steps ({n / 10:.0f}%)" for n in (503, 506, 509)]
    assert lines[0].endswith("| 11.00 s/step, elapsed 0:33, ETA 1:31:07")  # 497 steps at 3 per 33 s
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("train: 510/1000 steps (51%) |")  # the end, once
    bar.close()
    assert len(out.getvalue().splitlines()) == 4


def test_a_bar_without_a_total_and_an_iterable_bar():
    out, clock = io.StringIO(), Clock()
    with LineProgress(desc="scan", file=out, clock=clock) as bar:
        bar.update(3)
    assert out.getvalue() == "scan: 3 its | elapsed 0:00\n"
    out = io.StringIO()
    assert list(progress_bar(range(5), desc="items", file=out)) == [0, 1, 2, 3, 4]
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == [
        f"items: {n}/5 its ({20 * n}%)" for n in range(1, 6)]


def test_a_terminal_gets_tqdm_and_hidden_bars_write_nothing():
    from tqdm import tqdm

    environ = os.environ.get("TQDM_DISABLE")
    terminal = Terminal()
    bar = progress_bar(total=3, desc="shown", file=terminal)
    assert isinstance(bar, tqdm) and not bar.disable
    bar.update(3)
    bar.close()
    assert "\r" in terminal.getvalue() and "shown" in terminal.getvalue()
    assert isinstance(progress_bar(total=3, file=io.StringIO()), LineProgress)
    with progress_shown(False):
        for stream in (Terminal(), io.StringIO()):
            bar = progress_bar(total=3, desc="hidden", file=stream)
            bar.update(3)
            bar.close()
            assert stream.getvalue() == ""
    assert isinstance(progress_bar(total=3, file=io.StringIO()), LineProgress), "shown again after the block"
    assert os.environ.get("TQDM_DISABLE") == environ


def test_no_progress_silences_an_evaluation_run_in_process(tokenizer, capsys):
    model = tiny_llama()
    records = [{"instruction": f"What is {n} plus 1?", "input": "", "answer": str(n + 1)} for n in range(3)]
    task = get_task("number")
    evaluate_task(model, tokenizer, task, records, batch_size=1, max_new_tokens=2)
    shown = capsys.readouterr().err
    assert [line.split(" | ")[0] for line in shown.splitlines()] == [
        f"number: {n}/3 prompts ({100 * n / 3:.0f}%)" for n in (1, 2, 3)]
    with progress_shown(False):
        evaluate_task(model, tokenizer, task, records, batch_size=1, max_new_tokens=2)
    assert capsys.readouterr().err == ""


def _train_args(base_dir, data_file, out, *extra):
    return ["train", "--model", str(base_dir), "--data", str(data_file), "--output", str(out), "--max-steps", "20",
            "--batch-size", "1", "--grad-accum", "1", "--rank", "1", "--filter-rank", "2", "--max-seq-len", "64",
            "--device", "cpu", *extra]


def test_train_through_a_pipe_logs_ten_plain_lines(base_dir, data_file, tmp_path):
    command = [sys.executable, "-m", "liftft", *_train_args(base_dir, data_file, tmp_path / "run")]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300,
                          env={**os.environ, "TQDM_DISABLE": ""})
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("train lift:")]
    pattern = (r"train lift: (\d+)/20 steps \((\d+)%\), loss=\d+\.\d{4}, lr=\S+, tokens_per_s=[\d,]+ \| "
               r"[\d.]+ steps/s, elapsed \d+:\d\d, ETA \d+:\d\d")
    assert len(lines) == 10, done.stderr
    for step, line in zip(range(2, 21, 2), lines):
        match = re.fullmatch(pattern, line)
        assert match and int(match[1]) == step and int(match[2]) == 5 * step, line


def test_train_with_no_progress_logs_no_progress_line(base_dir, data_file, tmp_path, capfd):
    assert cli.main(_train_args(base_dir, data_file, tmp_path / "run", "--max-steps", "4", "--no-progress")) == 0
    assert "train lift" not in capfd.readouterr().err
    assert cli.main(_train_args(base_dir, data_file, tmp_path / "again", "--max-steps", "4")) == 0
    assert len([line for line in capfd.readouterr().err.splitlines() if line.startswith("train lift: ")]) == 4


def test_eval_with_no_progress_prints_no_bar_and_without_it_plain_lines(base_dir, tmp_path, capfd):
    records = [{"instruction": f"What is {n} plus 1?", "input": "", "answer": str(n + 1)} for n in range(3)]
    (tmp_path / "sums.json").write_text(json.dumps(records))

    def run(out, *extra):
        return cli.main(["eval", "--model", str(base_dir), "--output", str(tmp_path / out), "--task-file",
                         str(tmp_path / "sums.json"), "--kind", "number", "--max-new-tokens", "2", "--batch-size", "1",
                         "--no-bf16", "--device", "cpu", *extra])

    assert run("quiet", "--no-progress") == 0
    assert "sums:" not in capfd.readouterr().err
    assert run("shown") == 0
    err = capfd.readouterr().err
    assert "\r" not in err
    assert [line.split(" | ")[0] for line in err.splitlines() if line.startswith("sums:")] == [
        f"sums: {n}/3 prompts ({100 * n / 3:.0f}%)" for n in (1, 2, 3)]
