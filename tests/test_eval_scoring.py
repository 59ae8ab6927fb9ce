"""Scoring: log-likelihood ranking and batched generation, a failing batch costing only its own records."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import sentencepiece_style, tiny_llama
from eval_data import shipped_records
from tokenizers import models

from liftft.data.batches import encode_example
from liftft.eval import TASKS, candidates, continuation, evaluate_task, extract_answer
from liftft.data.template import build_prompt, encode_prompt, encode_response


# ------------------------------------------------ log-likelihood scoring


class _PreferTokens(torch.nn.Module):
    """A 'model' whose next-token logits are the same everywhere: high on a few favoured ids."""

    def __init__(self, vocab_size: int, favoured: set[int]):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size), requires_grad=False)
        self.bias.data[list(favoured)] = 8.0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def _response_ids(tokenizer, task, label, record):
    response = encode_response(tokenizer, build_prompt(record), continuation(task, label))
    return response + [tokenizer.eos_token_id]


@pytest.mark.parametrize("name", ["ARC-Challenge", "AQuA"])
def test_loglik_picks_the_candidate_the_logits_prefer(tokenizer, name):
    task, record = TASKS[name.lower()], shipped_records(name)[0]
    options = candidates(task, record)
    for target in options:
        own = set(_response_ids(tokenizer, task, target, record))
        others = set().union(*(_response_ids(tokenizer, task, o, record) for o in options if o != target))
        assert own - others, "precondition: the target has a token of its own"
        model = _PreferTokens(len(tokenizer), own - others)
        _, predictions = evaluate_task(model, tokenizer, task, [record], scoring="loglik")
        assert predictions[0]["prediction"] == target
        assert predictions[0]["correct"] == (target == record["answer"])


def test_loglik_scores_equal_unpadded_single_sequence_sums(tokenizer, model):
    task = TASKS["arc-challenge"]
    records = shipped_records("ARC-Challenge")[:4]
    summary, predictions = evaluate_task(model, tokenizer, task, records, scoring="loglik", batch_size=3)
    assert summary["count"] == 4 and summary["errors"] == 0 and summary["scoring"] == "loglik"
    for record, prediction in zip(records, predictions):
        prompt = encode_prompt(tokenizer, build_prompt(record))
        for label, score in prediction["candidates"].items():
            response = _response_ids(tokenizer, task, label, record)
            with torch.no_grad():
                logprobs = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
            expected = sum(logprobs[len(prompt) - 1 + j, token].item() for j, token in enumerate(response))
            assert score == pytest.approx(expected, abs=1e-3)
        assert prediction["prediction"] == max(prediction["candidates"], key=prediction["candidates"].get)


@pytest.mark.parametrize("style", ["metaspace", "prepend"])
def test_loglik_scores_exactly_the_tokens_training_labels(style, monkeypatch):
    task, record = TASKS["aqua"], shipped_records("AQuA")[0]
    prompt = build_prompt(record)
    # Trained on words, as SentencePiece learns pieces within words: no token spans the prompt/answer seam.
    texts = (prompt + " " + " ".join(continuation(task, label) for label in "ABCDE")).split()
    tok = sentencepiece_style(models.BPE(unk_token="<unk>"), style, texts)
    model = tiny_llama(vocab_size=len(tok))
    fed = []
    forward = model.forward

    def recording_forward(input_ids, attention_mask, **kwargs):
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            fed.append([token for token, m in zip(row, mask) if m])
        return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    _, predictions = evaluate_task(model, tok, task, [record], scoring="loglik")
    for label in candidates(task, record):
        answer = continuation(task, label)
        alone = tok(answer, add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(alone)[0].startswith("▁"), "precondition: alone, the answer starts a word"
        example = encode_example({**record, "output": answer}, tok, max_seq_len=4096)
        # Training and scoring see the pair as tokenized together, the answer without a word-boundary "▁".
        together = tok(prompt + answer)["input_ids"]
        assert together[: len(encode_prompt(tok, prompt))] == encode_prompt(tok, prompt), "precondition: no merge"
        assert example["input_ids"] == together + [tok.eos_token_id]
        assert example["input_ids"] in fed
        with torch.no_grad():
            logprobs = forward(input_ids=torch.tensor([example["input_ids"]])).logits[0].log_softmax(-1)
        expected = sum(logprobs[p - 1, t].item() for p, t in enumerate(example["labels"]) if t != -100)
        assert predictions[0]["candidates"][label] == pytest.approx(expected, abs=1e-4)


def test_a_failing_loglik_forward_is_an_error_for_its_record_only(tokenizer, model, monkeypatch):
    records = shipped_records("piqa")[:3]
    poison = encode_prompt(tokenizer, build_prompt(records[1]))
    real_forward = model.forward

    def flaky_forward(input_ids, attention_mask, **kwargs):
        if any(row[: len(poison)] == poison for row in input_ids.tolist()):
            raise RuntimeError("simulated failure")
        return real_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "forward", flaky_forward)
    summary, predictions = evaluate_task(model, tokenizer, TASKS["piqa"], records, scoring="loglik", batch_size=6)
    assert summary["errors"] == 1 and "simulated failure" in predictions[1]["error"]
    assert predictions[1]["prediction"] is None and predictions[1]["correct"] is False
    assert predictions[0]["error"] is None and predictions[0]["prediction"] in ("solution1", "solution2")


# ------------------------------------------------ generation


def test_batched_generation_equals_unbatched_and_holds_only_the_response(tokenizer, model):
    task = TASKS["gsm8k"]
    records = shipped_records("gsm8k")[:5]
    summary, predictions = evaluate_task(model, tokenizer, task, records, max_new_tokens=6, batch_size=5)
    assert summary["count"] == 5 and summary["errors"] == 0
    for record, prediction in zip(records, predictions):
        prompt = encode_prompt(tokenizer, build_prompt(record))
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        new = out[0, len(prompt) :].tolist()
        new = new[: new.index(2)] if 2 in new else new
        assert prediction["generation"] == tokenizer.decode(new, skip_special_tokens=True)
        assert prediction["extracted"]["strict"] == extract_answer(task, prediction["generation"])


def test_responses_are_cut_at_eos_and_marked_when_they_run_out(tokenizer, model, monkeypatch):
    words = tokenizer(" The answer is 7", add_special_tokens=False)["input_ids"]

    def fake_generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        assert (attention_mask[:, -1] == 1).all(), "left padding: every prompt ends at the last column"
        finished = words + [2] + [0] * (max_new_tokens - len(words) - 1)
        rows = [finished, (words * max_new_tokens)[:max_new_tokens]]
        return torch.cat([input_ids, torch.tensor(rows[: len(input_ids)])], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    records = shipped_records("gsm8k")[:2]
    _, predictions = evaluate_task(model, tokenizer, TASKS["gsm8k"], records, max_new_tokens=12, batch_size=2)
    by_length = sorted(predictions, key=lambda p: -len(encode_prompt(tokenizer, build_prompt(p))))
    assert by_length[0]["generation"] == " The answer is 7" and by_length[0]["truncated"] is False
    assert by_length[1]["truncated"] is True and by_length[1]["prediction"] == 7.0


def test_a_failing_generation_is_an_error_never_an_empty_string(tokenizer, model, monkeypatch):
    records = shipped_records("gsm8k")[:5]
    poison = encode_prompt(tokenizer, build_prompt(records[2]))
    real_generate = model.generate

    def flaky_generate(input_ids, attention_mask, **kwargs):
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            if [t for t, m in zip(row, mask) if m] == poison:
                raise RuntimeError("CUDA out of memory (simulated)")
        return real_generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(model, "generate", flaky_generate)
    summary, predictions = evaluate_task(model, tokenizer, TASKS["gsm8k"], records, max_new_tokens=3, batch_size=5)
    assert summary["errors"] == 1
    assert predictions[2]["generation"] is None and "out of memory" in predictions[2]["error"]
    assert predictions[2]["correct"] is False
    assert all(isinstance(p["generation"], str) and p["error"] is None for i, p in enumerate(predictions) if i != 2)
