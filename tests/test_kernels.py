"""The fused Triton sparse AdamW kernel against the pure-torch path (liftft.optim.adamw_update).

The kernel tests need CUDA and Triton and skip cleanly without them; the dispatch
tests run everywhere.
"""

import copy

import pytest
import torch

from conftest import tiny_llama
from liftft import LiftAdamW, LiftConfig, kernels
from liftft.optim import adamw_update

needs_cuda_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.triton is not None), reason="needs CUDA and Triton"
)
NUMEL, K = 3000, 1234  # neither a multiple of the kernel's block size


def torch_step(flat, idx, grad, exp_avg, exp_avg_sq, master, step, hyperparameters, clip):
    """LiftAdamW's torch path for one target, written out: clip, update fp32 values, write back rounded."""
    if clip is not None:
        grad = grad * clip
    values = master if master is not None else flat.index_select(0, idx).float()
    adamw_update(values, grad, exp_avg, exp_avg_sq, step, *hyperparameters)
    flat.index_put_((idx,), values.to(flat.dtype))


def test_cpu_never_dispatches_to_the_kernel(monkeypatch):
    assert not kernels.fused_available("cpu")
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert not kernels.fused_available("cuda")
    with pytest.raises(RuntimeError, match="needs CUDA and Triton"):
        kernels.sparse_adamw_step(torch.zeros(4), torch.arange(2), *(torch.zeros(2) for _ in range(3)), None,
                                  1, 1e-3, 0.9, 0.95, 1e-8, 0.0)


@needs_cuda_triton
@pytest.mark.parametrize("dtype,with_master", [(torch.float32, False), (torch.bfloat16, True),
                                               (torch.bfloat16, False), (torch.float16, True)])
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.3, 0.999)])  # 1 - 0.3 takes lerp's other branch
def test_kernel_matches_the_torch_path(dtype, with_master, clip, weight_decay, betas):
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(NUMEL, generator=gen, device="cuda").to(dtype)
    idx = torch.randperm(NUMEL, generator=gen, device="cuda")[:K].sort().values.to(torch.int32)
    clip = None if clip is None else torch.tensor(clip, device="cuda")

    def fresh():
        master = weight[idx].float() if with_master else None
        return weight.clone(), torch.zeros(K, device="cuda"), torch.zeros(K, device="cuda"), master

    fused, reference = fresh(), fresh()
    hyperparameters = (1e-2, *betas, 1e-8, weight_decay)
    for step in range(1, 5):
        grad = torch.randn(K, generator=gen, device="cuda")
        kernels.sparse_adamw_step(fused[0], idx, grad, *fused[1:], step, *hyperparameters, clip=clip)
        torch_step(reference[0], idx, grad, *reference[1:], step, hyperparameters, clip)

    # Same fp32 formula, op by op; only FMA contraction may differ, so allow a few ulps.
    for got, want in zip(fused[1:], reference[1:]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    unselected = torch.ones(NUMEL, dtype=torch.bool, device="cuda")
    unselected[idx.long()] = False
    assert torch.equal(fused[0][unselected], weight[unselected])
    if with_master:
        assert torch.equal(fused[0][idx.long()], fused[3].to(dtype))
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fused[0], reference[0], **tolerance)


@needs_cuda_triton
def test_lift_adamw_on_cuda_uses_the_kernel_and_matches_the_torch_path(monkeypatch):
    calls = []
    kernel = kernels.sparse_adamw_step
    monkeypatch.setattr(kernels, "sparse_adamw_step", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    base = tiny_llama(dtype=torch.bfloat16).cuda()
    ids = torch.randint(3, 512, (4, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))

    def train(model):
        opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, update_interval=None), lr=1e-2, max_grad_norm=0.5)
        for _ in range(4):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return opt

    fused_model, torch_model = copy.deepcopy(base), copy.deepcopy(base)
    fused = train(fused_model)
    assert calls, "the fused kernel was not used on CUDA"
    calls.clear()
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    reference = train(torch_model)
    assert not calls
    for name in fused.target_names:
        got, want = fused.state[fused_model.get_parameter(name)], reference.state[torch_model.get_parameter(name)]
        assert torch.equal(got["indices"], want["indices"])
        for key in ("exp_avg", "exp_avg_sq", "master"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
