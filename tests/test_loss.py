"""The chunked causal-LM loss against the plain computation from the full logits (liftft.engine.loss)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
import transformers

from conftest import tiny_llama
from liftft import LiftAdamW
from liftft import LiftConfig
from liftft.data.batches import IGNORE_INDEX
from liftft.engine.loss import (
    PLAIN_HEAD_MODELS,
    causal_lm_loss_sum,
    check_loss_mode,
    chunked_linear_cross_entropy,
    full_path_reason,
    loss_path,
)

pytestmark = pytest.mark.filterwarnings("ignore:filter_rank")

VOCAB = 512
TOKENS = 2 * 13  # the batch below: chunk sizes 5 and 7 do not divide it, 13 and 26 do


def batch():
    """Two sequences of 13, the second padded for its last 4 positions; labels ignored on the first's prompt."""
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :5] = IGNORE_INDEX
    return ids, mask, labels


def reference_loss(model, ids, mask, labels):
    """The summed next-token cross-entropy written out from the model's own logits."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, *batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def chunked(chunk_tokens):
    return lambda model, ids, mask, labels: causal_lm_loss_sum(model, ids, mask, labels, chunk_tokens=chunk_tokens)


def assert_same_loss_and_grads(model, chunk_tokens, rtol=1e-5, atol=1e-6):
    expected, expected_grads = loss_and_grads(model, reference_loss)
    loss, grads = loss_and_grads(model, chunked(chunk_tokens))
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 7, 13, 26, 1000])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_matches_the_full_logits_loss_and_every_gradient(chunk_tokens, tied):
    model = tiny_llama(vocab_size=VOCAB, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert full_path_reason(model) is None
    assert_same_loss_and_grads(model, chunk_tokens)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_chunked_matches_with_gradient_checkpointing():
    model = tiny_llama(vocab_size=VOCAB)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert_same_loss_and_grads(model, chunk_tokens=5)


@pytest.mark.parametrize("weights,autocast", [(torch.float32, True), (torch.bfloat16, False)],
                         ids=["fp32-weights-bf16-autocast", "bf16-weights"])
def test_chunked_matches_in_bf16_within_bf16_tolerance(weights, autocast):
    model = tiny_llama(vocab_size=VOCAB, dtype=weights)

    def in_bf16(loss_fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return loss_fn(*args)
        return run

    expected, expected_grads = loss_and_grads(model, in_bf16(reference_loss))
    loss, grads = loss_and_grads(model, in_bf16(chunked(7)))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0)
    for name, grad in grads.items():
        assert grad.dtype == weights, name
        scale = expected_grads[name].abs().max()
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=2e-2 * scale, msg=name)


def test_a_head_with_a_bias_gets_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    targets = torch.randint(40, (11,))
    targets[3] = IGNORE_INDEX
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    expected_grads = torch.autograd.grad(2.5 * expected, (hidden, weight, bias))
    loss = chunked_linear_cross_entropy(hidden, weight, bias, targets, chunk_tokens=4)
    torch.testing.assert_close(loss, expected)
    for grad, reference in zip(torch.autograd.grad(2.5 * loss, (hidden, weight, bias)), expected_grads):
        torch.testing.assert_close(grad, reference)


@pytest.mark.parametrize("tied", [False, True])
def test_lift_on_the_head_gathers_the_same_gradient_once_and_steps_alike(tied):
    dense = LiftConfig(rank=None, density=1.0, update_interval=None, target_modules=["lm_head"])
    models = {path: tiny_llama(vocab_size=VOCAB, tie_word_embeddings=tied) for path in ("full", "chunked")}
    plain = tiny_llama(vocab_size=VOCAB, tie_word_embeddings=tied)
    reference_loss(plain, *batch()).backward()
    betas = (0.9, 0.95)
    for path, model in models.items():
        opt = LiftAdamW(model, dense, lr=1e-2, betas=betas)
        (name,) = opt.target_names
        fired = []
        model.get_output_embeddings().weight.register_post_accumulate_grad_hook(lambda p: fired.append(1))
        loss = reference_loss(model, *batch()) if path == "full" else causal_lm_loss_sum(model, *batch(), chunk_tokens=5)
        loss.backward()
        assert len(fired) == 1
        opt.step()
        # After one step from zero moments, exp_avg is (1 - beta1) times the gathered gradient.
        gathered = opt.state_of(name)["exp_avg"] / (1 - betas[0])
        torch.testing.assert_close(gathered, plain.get_parameter(name).grad.flatten(), rtol=1e-4, atol=1e-6)
    # Adam's first step is about lr * sign(gradient); a gradient near eps may move within 1% of a step.
    torch.testing.assert_close(models["chunked"].lm_head.weight, models["full"].lm_head.weight, rtol=0, atol=1e-4)
    assert not torch.equal(models["chunked"].lm_head.weight, plain.lm_head.weight)


def test_the_graph_saves_no_logits_larger_than_a_chunk():
    def saved_shapes(loss_fn):
        shapes = []

        def record(tensor):
            shapes.append(tuple(tensor.shape))
            return tensor

        model = tiny_llama(vocab_size=VOCAB)
        with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
            loss_fn(model, *batch())
        return shapes

    def logits_rows(shapes):
        return max((torch.Size(s[:-1]).numel() for s in shapes if s and s[-1] == VOCAB), default=0)

    assert logits_rows(saved_shapes(reference_loss)) >= TOKENS - 2  # the full path keeps every position's logits
    assert logits_rows(saved_shapes(chunked(5))) == 0


@pytest.mark.parametrize("name", sorted(PLAIN_HEAD_MODELS))
def test_every_model_listed_as_a_plain_head_gives_its_own_loss(name):
    cls = getattr(transformers, name)
    torch.manual_seed(0)
    config = cls.config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                              shared_expert_intermediate_size=16, final_logit_softcapping=None,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = cls(config).eval()  # eval: no dropout, so both passes see the same function
    assert full_path_reason(model) is None
    assert_same_loss_and_grads(model, chunk_tokens=7, rtol=1e-4, atol=1e-5)


def test_logit_softcapping_takes_the_full_path():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       final_logit_softcapping=1.0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # logits well beyond the cap, so capping them changes the loss
    assert "final_logit_softcapping=1.0" in full_path_reason(model)
    assert loss_path(model, "chunked") == "full"
    # A plain head on the hidden states would give another loss: the cap is what the fallback keeps.
    ids, mask, labels = batch()
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    uncapped = F.cross_entropy(model.lm_head(hidden)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    loss = causal_lm_loss_sum(model, ids, mask, labels)
    torch.testing.assert_close(loss, reference_loss(model, ids, mask, labels))
    assert not torch.isclose(loss, uncapped, rtol=1e-2)


def test_a_transform_in_a_config_refuses_even_where_the_class_ignores_it():
    assert "logit_scale=0.5" in full_path_reason(tiny_llama(vocab_size=VOCAB, logit_scale=0.5))


def test_a_head_routed_by_sampled_grad_takes_the_full_path():
    model = tiny_llama(vocab_size=VOCAB)
    LiftAdamW(model, LiftConfig(rank=1, filter_rank=1, update_interval=None, target_modules=["lm_head"],
                                sampled_grad=True))
    assert "head" in full_path_reason(model)
    assert loss_path(model, "chunked") == "full"


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_peft_lora_uses_the_chunked_path_with_the_same_gradients():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(vocab_size=VOCAB), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero, so the A matrices get a gradient too
            torch.nn.init.normal_(p, std=0.1)
    assert loss_path(model, "chunked") == "chunked"
    assert_same_loss_and_grads(model, chunk_tokens=5)


def test_unknown_modes_and_chunk_sizes_are_refused():
    with pytest.raises(ValueError, match="unknown --loss 'fused'; allowed: chunked, full, liger"):
        check_loss_mode("fused")
    with pytest.raises(ValueError, match="chunk_tokens must be an integer >= 1"):
        causal_lm_loss_sum(tiny_llama(vocab_size=VOCAB), *batch(), chunk_tokens=0)


LIGER = importlib.util.find_spec("liger_kernel") is not None


@pytest.mark.skipif(LIGER, reason="Liger-Kernel is installed")
def test_liger_without_liger_kernel_is_refused_with_the_install_hint():
    with pytest.raises(ValueError, match=r"--loss liger needs Liger-Kernel.*pip install 'liftft\[liger\]'"):
        loss_path(tiny_llama(vocab_size=VOCAB), "liger")


@pytest.mark.skipif(not (LIGER and torch.cuda.is_available()), reason="needs Liger-Kernel and a CUDA GPU")
def test_liger_matches_the_chunked_loss():
    model = tiny_llama(vocab_size=VOCAB).cuda()
    ids, mask, labels = (t.cuda() for t in batch())
    expected = causal_lm_loss_sum(model, ids, mask, labels, mode="chunked")
    torch.testing.assert_close(causal_lm_loss_sum(model, ids, mask, labels, mode="liger"), expected,
                               rtol=1e-4, atol=1e-4)
