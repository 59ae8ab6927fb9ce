"""The Triton kernels (fused sparse AdamW step, gather) against the pure-torch paths of liftft.engine.optim.

The kernel runs on CUDA, or without a GPU in Triton's interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1 there); without Triton these tests skip cleanly.
"""

import copy
import re

import pytest
import torch

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft.engine import kernels
from liftft.engine.layout import compress
from liftft.engine.functional import adamw_update

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(not kernels.kernels_run_on(DEVICE), reason="needs Triton (on CUDA, or interpreted)")
SHAPE, K = (60, 50), 1234  # K is not a multiple of the kernel's block size
NUMEL = SHAPE[0] * SHAPE[1]


def torch_step(flat, idx, grad, exp_avg, exp_avg_sq, master, step, hyperparameters, clip):
    """LiftAdamW's torch path for one target, written out: clip, update fp32 values, write back rounded."""
    if clip is not None:
        grad = grad * clip
    values = master if master is not None else flat.index_select(0, idx).float()
    adamw_update(values, grad, exp_avg, exp_avg_sq, step, *hyperparameters)
    flat.index_put_((idx,), values.to(flat.dtype))


def test_dispatch_only_to_compiled_kernels_on_cuda(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    assert kernels.fused_available("cuda") == (kernels.triton is not None)
    assert not kernels.fused_available("cpu")
    monkeypatch.setattr(kernels, "INTERPRETED", True)  # interpreted kernels would be far slower than the torch path
    assert not kernels.fused_available("cuda")
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert not kernels.fused_available("cuda")


def test_the_kernels_refuse_a_device_they_cannot_run_on(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    row_offsets, columns = compress(torch.tensor([0, 3]), (2, 2))
    with pytest.raises(RuntimeError, match="need CUDA and Triton, or TRITON_INTERPRET=1 on the CPU"):
        kernels.sparse_adamw_step(torch.zeros(4), row_offsets, columns, 2, *(torch.zeros(2) for _ in range(3)), None,
                                  1, 1e-3, 0.9, 0.95, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match="need CUDA and Triton"):
        kernels.gather_selected(torch.zeros(4), row_offsets, columns, 2)


@needs_kernel
@pytest.mark.parametrize("shape,k", [(SHAPE, K), ((3, 40_000), 5000), ((2000, 3), 1500), ((1, 7), 7), ((5, 5), 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_equals_index_select(shape, k, dtype):
    """Wide rows (int32 columns), many empty rows, one row, a single entry."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    numel = shape[0] * shape[1]
    grad = torch.randn(numel, generator=gen, device=DEVICE).to(dtype)
    idx = torch.randperm(numel, generator=gen, device=DEVICE)[:k].sort().values
    got = kernels.gather_selected(grad, *compress(idx, shape), shape[1])
    assert got.dtype == torch.float32
    assert torch.equal(got, grad.index_select(0, idx).float())


@needs_kernel
@pytest.mark.parametrize("dtype,with_master", [(torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False),
                                               (torch.float16, True), (torch.float16, False)])
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("betas", [(0.9, 0.95), (0.3, 0.999)])  # 1 - 0.3 takes lerp's other branch
def test_kernel_matches_the_torch_path(dtype, with_master, clip, weight_decay, betas):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter rounds fp32 to bf16 towards zero (GPUs round to nearest); fp16 runs the same code")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weight = torch.randn(NUMEL, generator=gen, device=DEVICE).to(dtype)
    idx = torch.randperm(NUMEL, generator=gen, device=DEVICE)[:K].sort().values.to(torch.int32)
    layout = (*compress(idx, SHAPE), SHAPE[1])
    clip = None if clip is None else torch.tensor(clip, device=DEVICE)

    def fresh():
        master = weight[idx].float() if with_master else None
        return weight.clone(), torch.zeros(K, device=DEVICE), torch.zeros(K, device=DEVICE), master

    fused, reference = fresh(), fresh()
    hyperparameters = (1e-2, *betas, 1e-8, weight_decay)
    for step in range(1, 5):
        grad = torch.randn(K, generator=gen, device=DEVICE)
        kernels.sparse_adamw_step(fused[0], *layout, grad, *fused[1:], step, *hyperparameters, clip=clip)
        torch_step(reference[0], idx, grad, *reference[1:], step, hyperparameters, clip)

    unselected = torch.ones(NUMEL, dtype=torch.bool, device=DEVICE)
    unselected[idx.long()] = False
    assert torch.equal(fused[0][unselected], weight[unselected])
    assert not torch.equal(fused[0][idx.long()], weight[idx.long()])
    if DEVICE == "cuda":
        # The kernel computes torch's CUDA formula op by op, FMAs included: bit for bit.
        for got, want in zip(fused, reference):
            if want is not None:
                assert torch.equal(got, want)
        return
    # Torch's CPU kernels round a few ops differently (addcmul_ and addcdiv_ group their products otherwise, and
    # division by a scalar is exact), so a few ulps apart.
    for got, want in zip(fused[1:], reference[1:]):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The 16-bit weights are those values rounded, so they may land one ulp apart.
    ulp = {torch.float32: 2.0**-23, torch.float16: 2.0**-10}[dtype]
    torch.testing.assert_close(fused[0], reference[0], rtol=ulp, atol=1e-6)
    if with_master:
        assert torch.equal(fused[0][idx.long()], fused[3].to(dtype))


@needs_kernel
def test_lift_adamw_dispatches_to_the_kernel_and_matches_the_torch_path(monkeypatch):
    """On CUDA LiftAdamW picks the kernel itself; on the CPU the test forces the interpreted kernel in."""
    from liftft.engine import functional

    calls = []
    for name in ("sparse_adamw_step", "gather_selected"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _name=name, _kernel=kernel, **kw: calls.append(_name) or _kernel(*a, **kw))
    # fp16 on the CPU: Triton's interpreter rounds to bf16 towards zero (see above).
    base = tiny_llama(dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float16).to(DEVICE)
    ids = torch.randint(3, 512, (4, 12), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(0))

    def train(model):
        opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, update_interval=None), lr=1e-2, max_grad_norm=0.5)
        for _ in range(4):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return opt

    fused_model, torch_model = copy.deepcopy(base), copy.deepcopy(base)
    if DEVICE == "cpu":
        monkeypatch.setattr(functional, "kernels_possible", lambda t: True)
    fused = train(fused_model)
    assert set(calls) == {"sparse_adamw_step", "gather_selected"}, "the kernels were not used"
    calls.clear()
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    monkeypatch.setattr(functional, "kernels_possible", lambda t: False)
    reference = train(torch_model)
    assert not calls
    for name in fused.target_names:
        got, want = fused.state[fused_model.get_parameter(name)], reference.state[torch_model.get_parameter(name)]
        assert torch.equal(fused.indices(name), reference.indices(name))
        for key in ("exp_avg", "exp_avg_sq", "master"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False])
def test_backward_and_step_never_wait_for_the_gpu(fused, monkeypatch):
    """No .item(), nonzero or other device-to-host sync in the gradient hooks or step(), kernel or torch path."""
    if not fused:
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    model = tiny_llama(dtype=torch.bfloat16).cuda()
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, update_interval=None), lr=1e-2, max_grad_norm=0.5)
    ids = torch.randint(3, 512, (4, 12), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
        opt.step()
        opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def train_fp16(model, steps=3):
    ids = torch.randint(3, 512, (4, 12), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(0))
    opt = LiftAdamW(model, LiftConfig(rank=2, filter_rank=4, update_interval=None), lr=1e-2, max_grad_norm=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model


def wrong_learning_rate(kernel):
    """``kernel`` with a planted mistake: twice the learning rate (argument 9 of sparse_adamw_step)."""
    return lambda *args, **kw: kernel(*args[:9], 2 * args[9], *args[10:], **kw)


def raising(*args, **kw):
    raise RuntimeError("planted launch failure")


@needs_kernel
@pytest.mark.parametrize("planted,mismatch", [(wrong_learning_rate, "(master|weight) differs by up to"),
                                              (lambda kernel: raising, "the kernel raised RuntimeError: planted")])
def test_a_wrong_kernel_is_caught_at_its_first_step_and_the_torch_path_takes_over(planted, mismatch, monkeypatch):
    import warnings

    from liftft.engine import functional

    monkeypatch.setattr(functional, "KERNEL_VERDICTS", {})
    if DEVICE == "cpu":  # on the CPU only a test lets the interpreted kernels in
        monkeypatch.setattr(functional, "kernels_possible", lambda t: True)
    monkeypatch.setattr(kernels, "sparse_adamw_step", planted(kernels.sparse_adamw_step))
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    base = tiny_llama(dtype=dtype).to(DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallen_back = train_fp16(copy.deepcopy(base))
    disagreements = [w for w in caught if issubclass(w.category, RuntimeWarning) and "disagree" in str(w.message)]
    assert len(disagreements) == 1, "warn once per device and dtype"
    assert re.search(mismatch, str(disagreements[0].message))
    monkeypatch.setattr(functional, "kernels_possible", lambda t: False)
    torch_path = train_fp16(copy.deepcopy(base))
    for (name, a), b in zip(fallen_back.named_parameters(), torch_path.parameters()):
        assert torch.equal(a, b), name


@needs_kernel
def test_the_real_kernels_pass_their_check():
    from liftft.engine import functional

    for dtype in (torch.float32, torch.float16) if DEVICE == "cpu" else (torch.float32, torch.bfloat16, torch.float16):
        assert functional.kernel_mismatch(DEVICE, dtype) is None, dtype
