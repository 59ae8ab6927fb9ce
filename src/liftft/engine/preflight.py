"""What `liftft train` checks before any long work: targets, budgets and output, from the model's config alone.

Loading a real model's weights takes minutes, and tokenising the data more.
The model's config, instantiated on the meta device (shapes, no storage), is
enough to find the target matrices and their budgets, so settings that match
no module or train whole matrices are refused first.
"""

from __future__ import annotations

import torch

from liftft.engine.config import LiftConfig
from liftft.utils.hf import load_config
from liftft.engine.selection import budget
from liftft.engine.targets import find_targets

# A --rank that trains more of the targets than this is refused unless --density asks for it explicitly,
# and one above WARN_DENSITY, or one that trains any matrix whole, is reported.
REFUSE_DENSITY = 0.5
WARN_DENSITY = 0.25


def meta_model(path_or_id: str):
    """The model at ``path_or_id`` built from its config on the meta device: every shape, no weights loaded."""
    return meta_model_from_config(load_config(path_or_id))


def meta_model_from_config(config, dtype: torch.dtype = torch.float32):
    """The causal LM of transformers ``config`` on the meta device in ``dtype``: every shape, no storage.

    Raises ValueError naming the model type when transformers has no causal LM for it.
    """
    from transformers import AutoModelForCausalLM

    from liftft.utils.hf import DTYPE_KEYWORD

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **{DTYPE_KEYWORD: dtype})
    except ValueError as err:
        raise ValueError(f"model type {getattr(config, 'model_type', '?')!r} is not a causal LM that transformers "
                         f"can build ({str(err).splitlines()[0]})") from err


def check_budget(model, cfg: LiftConfig, sparse: bool) -> str | None:
    """Resolve ``cfg``'s targets (and, for a sparse method, budgets) on ``model``; a line to report, or None.

    Raises ValueError for targets that match nothing (find_targets names the
    model's linear modules) and for a ``cfg.rank`` that trains more than
    REFUSE_DENSITY of the target entries.
    """
    targets = find_targets(model, cfg.target_modules, cfg.exclude_modules)
    if not sparse:
        return None
    sizes = {name: (tuple(p.shape), p.numel()) for name, p in targets.items()}
    ks = {name: budget(shape, rank=cfg.rank, density=cfg.density) for name, (shape, _) in sizes.items()}
    total = sum(numel for _, numel in sizes.values())
    density = sum(ks.values()) / total
    whole = [name for name, (_, numel) in sizes.items() if ks[name] == numel]
    if cfg.rank is not None and density > REFUSE_DENSITY:
        raise ValueError(f"--rank {cfg.rank} would train {density:.1%} of the target entries of this model "
                         f"({len(whole)} of {len(targets)} matrices whole): that is not sparse fine-tuning. Pass a "
                         f"smaller --rank, or --density {density:.2f} to train that much on purpose")
    if cfg.rank is not None and (whole or density > WARN_DENSITY):
        return (f"--rank {cfg.rank} trains {density:.1%} of the target entries ({len(whole)} of {len(targets)} "
                f"matrices whole); a smaller --rank or a --density keeps LIFT sparse")
    return None
