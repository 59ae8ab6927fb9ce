"""Shared fixtures: tiny models built from a config, a tokenizer trained locally, the LLM-Adapters excerpts the
repository holds; and the rule that a test skips only for want of a GPU or of the paper's full data."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

# Without a GPU, liftft's Triton kernels run in Triton's interpreter on CPU tensors (tests/test_kernels.py).
# Triton reads this when liftft.engine.kernels defines them, so it is set before any test imports that module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch's default of a thread per core, whose OpenMP waits spin, stalls when other processes share the cores:
# with a second torch process on 2 cores a demo step took 10x longer on 2 threads than on 1 (docs/demo.md).
# The tests' models are tiny, so more than 2 threads gain nothing; fewer when the load shows the cores busy.
# OMP_NUM_THREADS, when set, decides (torch reads it); set here, it also reaches the CLIs the tests spawn.
if "OMP_NUM_THREADS" not in os.environ:
    from liftft.demo.threads import free_cores_now

    os.environ["OMP_NUM_THREADS"] = str(min(2, free_cores_now()))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# The tests read only what the repository holds: excerpts of the paper's LLM-Adapters data, a few dozen records per
# file (tests/fixtures/llm-adapters/SOURCE.md says which and why).
DATA = Path(__file__).resolve().parent / "fixtures" / "llm-adapters"
# The paper's full files stay outside the repository: $LIFTFT_FULL_DATA, else ../shared/data/llm-adapters beside it.
# Only a test of the full files reads them (full_data_path); it skips, naming the path, where they are absent.
FULL_DATA = Path(os.environ.get("LIFTFT_FULL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
                 / "llm-adapters").absolute()

# A test may skip only for want of a GPU or of the full data, so that a new dependency on anything else (a file
# outside the repository, a package the test extra should install) fails the run instead of quietly skipping:
# a skip's reason must name CUDA or a GPU, or the full data's path (as full_data_path's does). Any other skip is
# reported as a failure; more than MAX_SKIPS skips in a run fail it too.
ALLOWED_SKIP = re.compile(r"\b(?:CUDA|GPUs?)\b|" + re.escape(str(FULL_DATA)))
MAX_SKIPS = 25


def tiny_llama(seed: int = 0, vocab_size: int = 512, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights, small enough for CPU tests."""
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)


class Square(torch.nn.Module):
    """One bias-free Linear, ``proj``, holding ``weight``: a model whose single target is easy to reason about."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def train_and_save(tmp_path, tokenizer=None, dtype=torch.float32, steps=6, rank=1, update_interval=2):
    """Save a tiny base (and tokenizer) to tmp_path/base, train a copy with LIFT on its matrices and dense
    norms, save the delta to tmp_path/delta, and return the trained model."""
    from liftft import LiftAdamW
    from liftft import LiftConfig
    from liftft import save_delta

    base_dir = tmp_path / "base"
    tiny_llama(dtype=dtype).save_pretrained(base_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(base_dir)
    model = tiny_llama(dtype=dtype)
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    cfg = LiftConfig(rank=rank, filter_rank=2, update_interval=update_interval)
    opt = LiftAdamW(model, cfg, lr=1e-2, dense_params=norms)
    for step in range(steps):
        ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    save_delta(opt, tmp_path / "delta", base_model=str(base_dir))
    return model


def sample_ids():
    return torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(99))


def train_tokenizer(texts, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with <pad>=0, <s>=1, </s>=2."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def data_path(*parts: str) -> Path:
    """A path under the excerpts of the LLM-Adapters data that the repository holds (tests/fixtures/llm-adapters)."""
    path = DATA.joinpath(*parts)
    assert path.exists(), f"{path} is missing: tests/fixtures/llm-adapters/make_excerpts.py writes the excerpts"
    return path


def full_data_path(*parts: str) -> Path:
    """A path under the paper's full LLM-Adapters data (FULL_DATA); the test is skipped, naming it, when absent."""
    path = FULL_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing: this test reads the paper's full LLM-Adapters data (set $LIFTFT_FULL_DATA)")
    return path


def math_records(n: int | None = None) -> list[dict]:
    """The first ``n`` (default all) records of the excerpt of the paper's math training set."""
    with open(data_path("train", "math_data.json")) as f:
        records = json.load(f)
    assert n is None or n <= len(records), f"the excerpt holds {len(records)} records, not {n}"
    return records[:n]


@pytest.fixture(scope="session")
def tokenizer():
    from liftft.data.template import build_prompt

    texts = [build_prompt(r) + r["output"] for r in math_records()]
    return train_tokenizer(texts)


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer):
    """A tiny Llama and the test tokenizer saved with save_pretrained."""
    path = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """12 records of the excerpt of the paper's math training set."""
    path = tmp_path_factory.mktemp("data") / "math.json"
    path.write_text(json.dumps(math_records(12)))
    return path


# A chat template that renders its own BOS, as Llama-2's, Llama-3's and Mistral's do.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """A byte-level BPE tokenizer with <pad>=0, <s>=1, </s>=2, special <|system|>, <|user|>, <|assistant|>,
    <|end|>, and CHAT_TEMPLATE; its post-processor adds BOS, so a rendered conversation must not get a second."""
    texts = ["What is 2 plus 3? The answer is 5.", "Hello there, how are you? Fine, thanks."] * 20
    tok = train_tokenizer(texts, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def sentencepiece_style(model: models.BPE, style: str, texts=()) -> PreTrainedTokenizerFast:
    """A tokenizer of ``model`` (trained on ``texts`` when given) that marks the start of a text with "▁", as
    SentencePiece does, with <unk>=0, <s>=1, </s>=2.

    ``"metaspace"``: a Metaspace pre-tokenizer, as transformers builds for Llama-2 and Mistral (only the first
    piece of a text gets "▁", not one after a special token). ``"prepend"``: the normalizer of Llama-2's
    tokenizer.json, which prepends "▁" to every piece of text, even one after a special token.
    """
    tok = Tokenizer(model)
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    if texts:
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def run_interrupted(monkeypatch, step: int, run, when=lambda loop: True) -> None:
    """Call ``run()``, a training run, and stop it with KeyboardInterrupt where its optimizer step ``step + 1`` would
    begin, in the first training loop for which ``when(loop)`` holds (a sweep trains several), as a kill would; the
    training loop is itself again afterwards."""
    from liftft.training.loop import TrainingLoop

    original = TrainingLoop.train_step

    def stop(self, micro):
        if self.step == step and when(self):
            raise KeyboardInterrupt
        return original(self, micro)

    with monkeypatch.context() as patch:
        patch.setattr(TrainingLoop, "train_step", stop)
        with pytest.raises(KeyboardInterrupt):
            run()


# ------------------------------------------------------------- skips: only for want of a GPU or of the full data


def _unallowed_skip(report) -> str | None:
    """The reason of a skip that ALLOWED_SKIP does not allow, else None (also for a report that is no skip)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return None if ALLOWED_SKIP.search(reason) else reason


_skipped: list[str] = []  # the node ids of this run's allowed skips


def _check_skip(report) -> None:
    """Count an allowed skip; turn any other into a failure that says why."""
    reason = _unallowed_skip(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = (f"{reason}\nA test may skip only for want of a GPU or of the paper's full data "
                           f"({FULL_DATA}); its reason must name CUDA, a GPU or that path (tests/conftest.py, "
                           "ALLOWED_SKIP). Install what it needs, or ship the data it reads under tests/fixtures.")
    elif report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _check_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield  # a module that skips itself (pytest.importorskip at its top) is skipped here
    _check_skip(report)
    return report


def pytest_sessionfinish(session, exitstatus):
    if len(_skipped) > MAX_SKIPS and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if len(_skipped) > MAX_SKIPS:
        terminalreporter.write_line(f"{len(_skipped)} tests skipped, more than MAX_SKIPS={MAX_SKIPS} "
                                    "(tests/conftest.py): the run fails", red=True)
