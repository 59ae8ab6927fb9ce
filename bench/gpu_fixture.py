"""What bench/gpu_check.sh trains on, written locally: the GPU machine has no network, so nothing can be downloaded.

Writes into WORKDIR:
- ``base/``: a randomly initialised Llama (llama-1b's shape, or the tiny preset with --tiny) and a
  tokenizer trained on the data, both saved with save_pretrained, as `liftft train --model` expects;
- ``data.json``: arithmetic records {instruction, input, output}.

The 8B bench step takes the ``llama-8b`` preset of liftft.planning.shapes directly.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import LlamaConfig

from liftft.planning.bench import MODEL_CONFIGS, build_model
from liftft.demo.base import build_tokenizer
from liftft.data.template import build_prompt

RECORDS = 64
# Large enough to hold every number and word of the records as one token; the model's vocabulary stays its shape's.
TOKENIZER_VOCAB = 512


def arithmetic_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` additions and subtractions of two-digit numbers, with their answers."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b, op = rng.randrange(100), rng.randrange(100), rng.choice("+-")
        answer = a + b if op == "+" else a - b
        records.append({"instruction": f"What is {a} {op} {b}?", "input": "", "output": f"The answer is {answer}"})
    return records


def write_fixture(workdir: Path, tiny: bool, device: str) -> None:
    records = arithmetic_records(RECORDS)
    (workdir / "data.json").write_text(json.dumps(records, indent=1))
    tokenizer = build_tokenizer([build_prompt(r) + r["output"] for r in records], TOKENIZER_VOCAB)
    shape = MODEL_CONFIGS["tiny" if tiny else "llama-1b"]
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    # Built on the device in bf16: 1.2B parameters initialised in fp32 on the CPU would take minutes.
    model = build_model(config, torch.bfloat16, torch.device(device))
    model.save_pretrained(workdir / "base")
    tokenizer.save_pretrained(workdir / "base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for the CPU dry run")
    parser.add_argument("--device", default="cuda", help="where the model is initialised (default: cuda)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    write_fixture(args.workdir, args.tiny, args.device)


if __name__ == "__main__":
    main()
