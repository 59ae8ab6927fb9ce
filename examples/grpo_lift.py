"""GRPO (TRL's GRPOTrainer) with LiftAdamW: reinforcement learning that updates only the Principal Weights.

    pip install "liftft[trl]"
    python examples/grpo_lift.py --model MODEL --output DIR [--steps N]

The toy reward counts the letter "a" in each completion, so any causal LM
(a hub id or a local directory) can learn it in a few steps. Everything LIFT
needs comes from two liftft pieces: ``lift_optimizers`` builds the LiftAdamW and
its schedule from the GRPOConfig, and ``LiftTrainerCallback`` clips, reports
the trained count and gradient norm, and saves the compact delta into every
checkpoint and into DIR. tests/test_integrations.py runs this file on a tiny model.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

import liftft

PROMPTS = ["Say something:", "Write a word:", "Answer:", "Go on:"]


def count_a(completions, **kwargs) -> list[float]:
    """The toy reward: how many times the letter a occurs in each completion."""
    return [float(completion.count("a")) for completion in completions]


def build_trainer(model: str, output: str, steps: int = 4, cfg: liftft.LiftConfig | None = None,
                  **config) -> GRPOTrainer:
    """A GRPOTrainer over ``model`` whose optimizer is LiftAdamW (``cfg``, default rank 4, refreshed every 2 steps)."""
    cfg = cfg or liftft.LiftConfig(rank=4, filter_rank=8, update_interval=2)
    policy = AutoModelForCausalLM.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    settings = dict(output_dir=output, max_steps=steps, learning_rate=1e-2, per_device_train_batch_size=4,
                    num_generations=4, max_completion_length=8, logging_steps=1, save_steps=2, report_to=[],
                    bf16=False)
    args = GRPOConfig(**{**settings, **config})
    return GRPOTrainer(model=policy, reward_funcs=count_a, args=args, processing_class=tokenizer,
                       train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS * steps]),
                       optimizers=liftft.lift_optimizers(policy, args, cfg), callbacks=[liftft.LiftTrainerCallback()])


def main(argv: list[str] | None = None) -> GRPOTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="policy model: a hub id or a local directory")
    parser.add_argument("--output", required=True, help="output dir: checkpoints, and the final delta")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (default 4)")
    args = parser.parse_args(argv)
    trainer = build_trainer(args.model, args.output, args.steps)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
