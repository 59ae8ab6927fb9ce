"""How far is a QLIFT delta added to the original 16-bit weights from the model the run trained?

A QLIFT run trains dequant(W₄) + Δ. `liftft merge` writes exactly that model; `liftft merge --original-weights`
writes W₁₆ + Δ instead, the delta added to weights it was not trained on. This script measures the gap on the demo's
pretrained base (built once and cached by `liftft demo`), after a short QLIFT run on the demo's target problems:

    python bench/qlift_merge_gap.py [--steps 60] [--quant-type nf4] [--nested] [--out DIR]

It prints, on held-out target prompts, the mean KL divergence of each model's next-token distribution from the
trained model's, the largest absolute logit difference, and how often their greedy next tokens agree; for scale, the
same figures for the 16-bit base against its 4-bit load (the quantization error the delta was trained around).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import liftft
from liftft.data.template import build_prompt, encode_prompt
from liftft.demo.base import DemoSettings, get_base
from liftft.utils.quantization import bnb_config


def liftft_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "liftft", *args, "--no-progress"], check=True)


def batch_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """The next-token logits after each prompt, (prompts, vocab), fp32."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([ids])).logits[:, -1].float() for ids in prompts])


def gap(reference: torch.Tensor, other: torch.Tensor) -> dict:
    kl = F.kl_div(F.log_softmax(other, -1), F.log_softmax(reference, -1), log_target=True, reduction="batchmean")
    return {"mean_kl": kl.item(), "max_abs_logit_diff": (reference - other).abs().max().item(),
            "greedy_agreement": (reference.argmax(-1) == other.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--quant-type", default="nf4", choices=("nf4", "fp4"))
    parser.add_argument("--nested", action="store_true")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--out", help="working directory (default: a temporary one)")
    args = parser.parse_args()

    settings = DemoSettings()
    base = get_base(settings.base, progress=False)
    train, test = settings.target_split(seed=0)
    work = Path(args.out or tempfile.mkdtemp(prefix="qlift-gap-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.json").write_text(json.dumps(train))
    run = work / "run"
    quant = ["--load-in-4bit", "--bnb-4bit-quant-type", args.quant_type] + ["--use-bnb-nested-quant"] * args.nested
    liftft_cli("train", "--model", str(base.path), "--data", str(work / "train.json"), "--output", str(run),
               "--max-steps", str(args.steps), "--batch-size", "16", "--grad-accum", "1", "--lr", "1e-3",
               "--rank", "8", "--filter-rank", "32", "--update-interval", "20", "--max-seq-len", "128",
               "--device", "cpu", *quant)
    liftft_cli("merge", "--model", str(base.path), "--delta", str(run), "--output", str(work / "trained"))
    liftft_cli("merge", "--model", str(base.path), "--delta", str(run), "--output", str(work / "onto-original"),
               "--original-weights")

    prompts = [encode_prompt(base.tokenizer, build_prompt(record)) for record in test[: args.prompts]]
    config = bnb_config(args.quant_type, args.nested, torch.float32)
    logits = {name: batch_logits(AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32), prompts)
              for name in ("trained", "onto-original")}
    base_16 = batch_logits(AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32), prompts)
    base_4bit = AutoModelForCausalLM.from_pretrained(base.path, quantization_config=config, dtype=torch.float32)
    quantized_base = batch_logits(base_4bit, prompts)
    applied = batch_logits(liftft.apply_delta(base_4bit, run), prompts)
    report = {
        "settings": {**vars(args), "prompts": len(prompts), "trained_entries": liftft.load_delta(run).num_entries},
        "trained 4-bit (apply_delta) vs merged trained model": gap(logits["trained"], applied),
        "W16 + delta (--original-weights) vs trained model": gap(logits["trained"], logits["onto-original"]),
        "16-bit base vs its 4-bit load (for scale)": gap(base_16, quantized_base),
        "trained model vs 16-bit base (what training moved)": gap(base_16, logits["trained"]),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
