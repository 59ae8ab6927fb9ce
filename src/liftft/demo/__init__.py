"""`liftft demo`: the LIFT story offline, on a model the demo pretrains itself.

- `liftft.demo.data`: the generated world, its source facts and target word problems.
- `liftft.demo.base`: the tokenizer and small Llama pretrained on the source, cached on disk.
- `liftft.demo.run`: one demo run: fine-tune the base with each method over a grid of learning rates.
- `liftft.demo.finetune`: one scored run: the `liftft train` loop, scored at several steps.
- `liftft.demo.frontier`: each method's learning-forgetting frontier and its retention at matched learning.
- `liftft.demo.threads`: how many torch threads the demo's CPU work gets.
- `liftft.demo.report`: the methods' labels, the printed table and demo.png.
"""

from liftft.demo.report import DEMO_METHODS, LABELS

__all__ = ["DEMO_METHODS", "LABELS", "parse_methods", "run_demo"]


def __getattr__(name):
    # Lazy, so that the CLI can list the demo's methods without importing transformers.
    if name in ("parse_methods", "run_demo"):
        from liftft.demo import run

        return getattr(run, name)
    raise AttributeError(f"module 'liftft.demo' has no attribute {name!r}")
