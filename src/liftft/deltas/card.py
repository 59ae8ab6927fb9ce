"""Model cards: the README.md of a delta or merged model, holding the facts its liftft.json records.

The card is what the Hugging Face Hub shows for a repository: YAML front
matter (``base_model``, ``library_name: liftft``, tags) and a short text naming
the base model, the method and its budget, the data and the metrics, and how
to load the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from liftft.utils.atomic import atomic_write
from liftft.engine.config import PRINCIPAL_SELECTORS
from liftft.deltas.delta import DELTA_FILE
from liftft.engine.methods import PEFT_METHODS, SPARSE_SELECTORS
from liftft.utils.hf import CONFIG_FILE, looks_local

CARD_FILE = "README.md"
TAGS = ["liftft"]
SPARSE_TAGS = ["lift", "sparse-fine-tuning"]


def model_card(meta: dict, *, merged: bool = False) -> str:
    """The README.md text for a delta (``merged=False``) or a merged model directory whose delta recorded ``meta``.

    ``meta`` has liftft.json's form: ``base_model``, ``config`` (the
    LiftConfig), ``training_args`` and ``metrics``; any of them may be absent.
    """
    from huggingface_hub import ModelCardData

    base = meta.get("base_model")
    method = method_name(meta)
    # The Hub checks base_model against its repositories, so a local path stays in the text only.
    hub_base = base if base and not looks_local(base) and not os.path.exists(os.path.expanduser(base)) else None
    tags = [*TAGS, *(SPARSE_TAGS if method in SPARSE_SELECTORS else []), method]
    data = ModelCardData(base_model=hub_base, library_name="liftft", tags=list(dict.fromkeys(tags)))
    sections = [
        f"# {method} fine-tune of {base or 'an unrecorded base model'}",
        f"{'A merged model' if merged else 'A liftft delta'}: {_what_it_is(merged)}",
        "## Method and budget\n\n" + _bullets(_method_facts(meta, method)),
        "## Data\n\n" + _bullets(_data_facts(meta)),
        "## Metrics\n\n" + _bullets(_metric_facts(meta)),
        "## Usage\n\n" + _usage(merged),
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def write_model_card(directory, meta: dict, *, merged: bool = False) -> Path:
    """Atomically write :func:`model_card` to ``directory``/README.md and return its path."""
    path = Path(directory) / CARD_FILE
    text = model_card(meta, merged=merged)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def write_model_cards(directories, meta: dict) -> list[Path]:
    """Write the card of ``meta`` into each of ``directories`` that holds a delta (a delta's card) or a model's
    config.json (a merged model's card); skip the others. Returns the cards written."""
    written = []
    for directory in map(Path, directories):
        if (directory / DELTA_FILE).is_file() or (directory / CONFIG_FILE).is_file():
            written.append(write_model_card(directory, meta, merged=not (directory / DELTA_FILE).is_file()))
    return written


def method_name(meta: dict) -> str:
    """The fine-tuning method: what `liftft train` recorded, else "lift" or the name of the config's selector."""
    method = meta.get("training_args", {}).get("method")
    if method:
        return method
    selector = meta.get("config", {}).get("selector", "principal")
    return "lift" if selector == "principal" else selector


def _what_it_is(merged: bool) -> str:
    if merged:
        return "the base model with the fine-tune's weights in place, loadable like any Hugging Face model."
    return ("only the entries the fine-tune changed (delta.safetensors) and what they were trained from "
            "(liftft.json); it needs its base model to load.")


def _method_facts(meta: dict, method: str) -> list[str]:
    """What was trained and at what budget, as far as ``method`` has each of them."""
    config = meta.get("config", {})
    facts = [f"method: `{method}` ([LIFT, arXiv 2506.00772](https://arxiv.org/abs/2506.00772) and its baselines)"]
    if method == "full":
        facts.append("every parameter trained")
    elif method in PEFT_METHODS and config.get("rank") is not None:
        facts.append(f"adapter: rank {config['rank']}, alpha {2 * config['rank']}")
    elif config.get("rank") is not None:
        facts.append(f"budget: rank {config['rank']} per matrix, the parameter count of a LoRA of that rank")
    elif config.get("density") is not None:
        facts.append(f"budget: density {config['density']} of each matrix")
    if method in SPARSE_SELECTORS:
        if config.get("selector", "principal") in PRINCIPAL_SELECTORS and "filter_rank" in config:
            facts.append(f"filter rank: {config['filter_rank']}")
        if "update_interval" in config:
            interval = config["update_interval"]
            facts.append(f"selection refreshed every {interval} steps" if interval else "selection never refreshed")
    if method != "full" and "target_modules" in config:
        facts.append(f"target modules: {config['target_modules']}")
    quantization = meta.get("quantization")
    if quantization:
        nested = ", nested quantization" * bool(quantization.get("bnb_4bit_use_double_quant"))
        facts.append(f"trained on a 4-bit base (bitsandbytes {quantization.get('bnb_4bit_quant_type')}{nested}): "
                     "the delta is relative to the dequantized weights, and `liftft.from_pretrained` gives the 16-bit "
                     "model it trained")
    trainable = meta.get("metrics", {}).get("trainable")
    if trainable is not None:
        facts.append(f"trained values per step: {trainable:,}")
    return facts


def _data_facts(meta: dict) -> list[str]:
    files = meta.get("training_args", {}).get("data")
    facts = [f"training data: {', '.join(map(str, files)) if isinstance(files, list) else files}"] if files else []
    stats = meta.get("metrics", {}).get("data")
    if isinstance(stats, dict):
        facts += [f"{key}: {value}" for key, value in stats.items()]
    return facts or ["not recorded"]


def _metric_facts(meta: dict) -> list[str]:
    metrics = meta.get("metrics", {})
    facts = [f"{key}: {value}" for key, value in metrics.items()
             if key not in ("data", "trainable") and isinstance(value, (int, float, str))]
    return facts or ["not recorded"]


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def _usage(merged: bool) -> str:
    if merged:
        return ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
                "model = AutoModelForCausalLM.from_pretrained(\"THIS_DIRECTORY_OR_REPO\")\n```")
    return ("```python\nimport liftft  # pip install liftft\n\n"
            "model = liftft.from_pretrained(\"THIS_DIRECTORY_OR_REPO\")  # the base model with this delta applied\n```")
