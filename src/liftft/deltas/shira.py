"""Exporting a delta as a PEFT SHiRA adapter, which stock PEFT loads with ``PeftModel.from_pretrained``.

SHiRA (Sparse High Rank Adapter) adds, to each adapted nn.Linear of shape
m x n, exactly r(m+n) trained entries: ``shira_indices`` (their row/column
pairs, in row-major order) and ``shira_weight`` (their values). PEFT's
ShiraConfig takes one r for all modules (it has no per-module rank pattern),
so the export uses the smallest r that holds every matrix's trained entries
and pads each matrix with untouched entries of value 0. Dense params of the
delta (norms, say) travel as PEFT ``modules_to_save``: full copies of their
modules holding the trained values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

SHIRA_FILE = "liftft_shira.json"
ADAPTER_NAME = "default"


def export_shira(delta_dir: str, output: str, *, base: str | None = None) -> Path:
    """Write the delta at ``delta_dir`` as a PEFT SHiRA adapter directory ``output`` and return its path.

    ``base`` (default: the base model recorded in the delta) is loaded to check
    the delta's fingerprints and module types. The chosen r, and whether it
    exceeds the run's LoRA-parity rank because refreshes widened the trained
    entries, is printed and recorded in ``output``/liftft_shira.json. Raises
    ValueError, before writing anything, for a delta of a 4-bit base (QLIFT), for a damaged delta (before loading
    ``base``), and for a delta whose sparse weights are not nn.Linear weights
    or that no SHiRA r can hold. What an interrupted export to ``output`` left
    beside it is removed first.
    """
    from liftft.deltas.delta import check_compatible, load_delta
    from liftft.utils.hf import check_model_path, load_model
    from liftft.utils.atomic import atomic_directory, remove_leftovers
    from liftft.deltas.merge import recorded_dtype
    from liftft.utils.outputs import check_output_dir

    delta = load_delta(delta_dir)
    if "quantization" in delta.meta:
        raise ValueError(f"delta {delta_dir} was trained on a 4-bit base: its values are relative to the dequantized "
                         "4-bit weights, but a SHiRA adapter is added to the base's 16-bit weights, so it would not "
                         "reproduce the trained model; use liftft merge (the 16-bit model the run trained), or "
                         "liftft.apply_delta on the base loaded in 4 bits as the run loaded it")
    output = check_output_dir(output, SHIRA_FILE, "SHiRA export")
    remove_leftovers(output)
    base = base or delta.meta.get("base_model")
    if base is None:
        raise ValueError(f"delta {delta_dir} records no base model; pass the base model (--base)")
    check_model_path(base)
    sparse = {name: e for name, e in delta.entries.items() if e[0] is not None}
    if not sparse:
        raise ValueError(f"delta {delta_dir} has no sparse matrices for SHiRA to hold")
    r = shira_rank(delta)

    model = load_model(base, dtype=recorded_dtype(delta.meta, delta_dir))
    check_compatible(model, delta)
    _check_modules(model, delta)
    modules_to_save = _apply_dense_params(model, delta)
    entries = {_module_name(name): shira_entries(idx, values, delta.meta["weights"][name]["shape"], r)
               for name, (idx, values) in sparse.items()}
    peft_model = _shira_model(model, entries, modules_to_save, r)

    record = _export_record(delta, delta_dir, base, r, modules_to_save)
    with atomic_directory(output) as tmp:
        peft_model.save_pretrained(tmp)
        (tmp / SHIRA_FILE).write_text(json.dumps(record, indent=2))
    print(_summary(record))
    return output


def shira_rank(delta) -> int:
    """The smallest r whose r(m+n) entries per matrix hold the trained entries of every sparse weight.

    Raises ValueError naming the first matrix for which that r breaks SHiRA's
    limit r(m+n) <= m*n.
    """
    shapes = {name: delta.meta["weights"][name]["shape"] for name, (idx, _) in delta.entries.items() if idx is not None}
    needed = {name: math.ceil(delta.entries[name][0].numel() / (rows + cols)) for name, (rows, cols) in shapes.items()}
    widest = max(needed, key=needed.get)
    r = max(1, needed[widest])
    for name, (rows, cols) in shapes.items():
        if r * (rows + cols) > rows * cols:
            raise ValueError(
                f"SHiRA cannot hold {name} ({rows}x{cols}): one r serves all modules, and r={r} (needed for "
                f"{widest}) gives r(m+n)={r * (rows + cols)} entries, more than its {rows * cols}; "
                "use `liftft merge` instead"
            )
    return r


def shira_entries(indices: torch.Tensor, values: torch.Tensor, shape, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SHiRA's (sorted flat indices, fp32 values) for one matrix: the trained entries plus zero-valued padding.

    There are exactly r(m+n) of them; the padding is the lowest untouched flat
    indices, so the result is deterministic.
    """
    rows, cols = shape
    indices = indices.long()
    pad = r * (rows + cols) - indices.numel()
    chosen = torch.zeros(rows * cols, dtype=torch.bool)
    chosen[indices] = True
    # The first len(indices) + pad flat positions hold at least pad untouched ones.
    candidates = torch.arange(min(indices.numel() + pad, rows * cols))
    chosen[candidates[~chosen[candidates]][:pad]] = True
    flat = chosen.nonzero().flatten()
    weight = torch.zeros(flat.numel(), dtype=torch.float32)
    weight[torch.searchsorted(flat, indices)] = values.float()
    return flat, weight


def _module_name(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def _check_modules(model: nn.Module, delta) -> None:
    # In delta (model) order, so the error names the first offending module.
    sparse_modules = list(dict.fromkeys(_module_name(n) for n, (idx, _) in delta.entries.items() if idx is not None))
    for name in sparse_modules:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{name} is a {type(module).__name__}, and PEFT's SHiRA adapts only torch.nn.Linear layers "
                "(not GPT-2 style Conv1D); this delta can't be exported as SHiRA, use `liftft merge` instead"
            )
    for name, (idx, _) in delta.entries.items():
        if idx is None and _module_name(name) in sparse_modules:
            raise ValueError(
                f"dense delta entry {name} belongs to SHiRA-adapted module {_module_name(name)}; "
                "SHiRA cannot also carry it"
            )


def _apply_dense_params(model: nn.Module, delta) -> list[str]:
    """Apply the delta's dense params to ``model`` and return their modules, which become ``modules_to_save``."""
    from liftft.deltas.delta import Delta, apply_delta

    dense = [name for name, (idx, _) in delta.entries.items() if idx is None]
    meta = {**delta.meta, "weights": {name: delta.meta["weights"][name] for name in dense}}
    apply_delta(model, Delta({name: delta.entries[name] for name in dense}, meta))
    return sorted({_module_name(name) for name in dense})


def _shira_model(model, entries: dict[str, tuple[torch.Tensor, torch.Tensor]], modules_to_save: list[str], r: int):
    """``model`` wrapped by PEFT with a SHiRA adapter holding ``entries``: {module name: (flat indices, values)}."""
    from peft import ShiraConfig, get_peft_model

    config = ShiraConfig(r=r, target_modules=list(entries), modules_to_save=modules_to_save or None,
                         task_type="CAUSAL_LM")
    names = {id(model.get_submodule(name)): name for name in entries}

    def mask_from_entries(base_layer, r, **kwargs):
        flat, _ = entries[names[id(base_layer)]]
        mask = torch.zeros(base_layer.weight.numel(), dtype=base_layer.weight.dtype, device=base_layer.weight.device)
        mask[flat.to(mask.device)] = 1
        return mask.view_as(base_layer.weight)

    # Set after construction, as PEFT documents for custom masks: the saved config keeps mask_type="random",
    # which stock PEFT can load (its random mask is replaced by the saved shira_indices).
    config.mask_fn = mask_from_entries
    peft_model = get_peft_model(model, config)
    for name, (_, weight) in entries.items():
        param = peft_model.base_model.model.get_submodule(name).shira_weight[ADAPTER_NAME]
        # Replaced, not copied into, so the saved values stay fp32 whatever the base dtype.
        param.data = weight.to(param.device)
    return peft_model


def _export_record(delta, delta_dir, base: str, r: int, modules_to_save: list[str]) -> dict:
    """What liftft_shira.json records about the export, including why r is what it is."""
    run_rank = delta.meta.get("config", {}).get("rank")
    trained = padding = over_run_rank = 0
    for name, (idx, _) in delta.entries.items():
        if idx is None:
            continue
        rows, cols = delta.meta["weights"][name]["shape"]
        trained += idx.numel()
        padding += r * (rows + cols) - idx.numel()
        over_run_rank += run_rank is not None and idx.numel() > run_rank * (rows + cols)
    return {
        "delta": str(Path(delta_dir).resolve()),
        "base_model": base,
        "r": r,
        "run_rank": run_rank,
        "r_exceeds_run_rank": run_rank is not None and r > run_rank,
        "matrices_over_run_rank": over_run_rank,
        "matrices": sum(idx is not None for idx, _ in delta.entries.values()),
        "trained_entries": trained,
        "padding_entries": padding,
        "modules_to_save": modules_to_save,
    }


def _summary(record: dict) -> str:
    text = (
        f"SHiRA r={record['r']}: the smallest r whose r(m+n) entries per matrix hold every matrix's trained entries "
        f"({record['trained_entries']} in all; {record['padding_entries']} untouched entries pad with value 0)."
    )
    if record["r_exceeds_run_rank"]:
        text += (
            f" r exceeds the run's rank {record['run_rank']}: refreshes widened the trained entries beyond "
            f"{record['run_rank']}(m+n) in {record['matrices_over_run_rank']} of {record['matrices']} matrices."
        )
    if record["modules_to_save"]:
        text += f" Dense params travel as modules_to_save: {', '.join(record['modules_to_save'])}."
    return text
