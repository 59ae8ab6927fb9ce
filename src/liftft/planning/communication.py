"""What `liftft estimate` says crosses the network per optimizer step, and through each GPU's link."""

from __future__ import annotations

FP32 = 4
# The training loop's per-step totals (token count; loss sum and tokens seen), all-reduced as fp64.
LOOP_TOTALS_BYTES = 3 * 8


def communication(plan, unit_numels: list[int], gpus: int, fsdp: bool, element_bytes: int) -> dict:
    """{collective: bytes liftft hands it per optimizer step} for a method's ``plan`` (liftft.planning.estimate) with
    FSDP2 units of ``unit_numels`` parameters (the root's first)."""
    if gpus == 1:
        return {}
    if not fsdp:
        return {"all-reduce gradients (fp32)": FP32 * sum(plan.reduced),
                "all-reduce loop totals (fp64)": LOOP_TOTALS_BYTES}
    units = unit_numels
    return {
        f"all-gather parameters ({'bf16' if element_bytes == 2 else 'fp32'})":
            element_bytes * (2 * sum(units[1:]) + units[0]),
        "reduce-scatter gradients (fp32)": FP32 * plan.scattered,
        "all-reduce loop totals (fp64)": LOOP_TOTALS_BYTES,
    }


def link_bytes(communication: dict, gpus: int) -> int:
    """Bytes through each GPU's link for ``communication`` with ring algorithms: 2(N-1)/N of an all-reduce's
    tensor, (N-1)/N of an all-gather's or reduce-scatter's whole tensor."""
    share = (gpus - 1) / gpus
    return round(sum(size * (2 * share if name.startswith("all-reduce") else share)
                     for name, size in communication.items()))
