"""The demo's base model: a tokenizer and a small Llama pretrained on the source
domain of `liftft.demo.data`, cached on disk so that only the first run pays for it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from liftft.demo.data import World, corpus_texts, make_source, make_target, make_world, pretraining_records
from liftft.data.template import build_prompt, encode_prompt
from liftft.utils.progress import progress_bar

# Bump when the pretraining recipe changes in a way the settings do not show.
CACHE_VERSION = 1
_MARKER = "demo_base.json"
_MAY_BE_ZERO = ("seed", "fact_repeats", "arithmetic_repeats", "n_stories")


@dataclass(frozen=True)
class BaseSettings:
    """Everything that determines the base model; the cache is keyed by a hash of it.

    The world has ``n_people`` people (seeded by ``seed``). Pretraining reads
    the source questions and profiles ``fact_repeats`` times, the arithmetic
    table for counts up to ``max_value`` ``arithmetic_repeats`` times and
    ``n_stories`` stories to repeat from, for ``pretrain_steps`` AdamW steps of
    ``batch_size`` sequences at peak rate ``lr``. The defaults are calibrated
    so that the base knows every fact, every sum and how to read back from its
    prompt, in about two minutes on two CPU cores.
    """

    seed: int = 0
    n_people: int = 48
    fact_repeats: int = 30
    arithmetic_repeats: int = 10
    n_stories: int = 3000
    max_value: int = 20
    vocab_size: int = 800
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    pretrain_steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3

    def __post_init__(self):
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name, value in asdict(self).items():
            if name == "lr":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            minimum = 0 if name in _MAY_BE_ZERO else 1
            if value < minimum:
                raise ValueError(f"{name} must be at least {minimum}, got {value}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    def key(self) -> str:
        """A short hash of these settings and the cache format version."""
        text = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def world(self) -> World:
        """The world whose facts this base learns."""
        return make_world(self.seed, self.n_people)

    def records(self) -> list[dict]:
        """The pretraining records, unshuffled."""
        return pretraining_records(
            self.world(), fact_repeats=self.fact_repeats, arithmetic_repeats=self.arithmetic_repeats,
            n_stories=self.n_stories, max_value=self.max_value, seed=self.seed,
        )  # fmt: skip


@dataclass(frozen=True)
class DemoSettings:
    """The sizes of a whole demo run: the base, the target data and the fine-tuning budget.

    Calibrated on 2 CPU cores: the default base pretrains in about 1.5 to 4
    minutes and scores 1.0 on the source, 0 to 0.02 on the target. A run of
    ``finetune_steps`` steps of ``finetune_batch_size`` problems is 200 steps,
    so that the demo's 10 runs fit in about 10 minutes with pretraining; at
    400, a Full FT (AdamW, lr 1e-3) reached 0.6 to 0.66 target accuracy over
    three seeds.

    Each run is scored at the fractions ``score_at`` of its steps, on the
    source facts and the first ``n_scored_target`` target test problems; each
    method runs at the highest ``rates_per_method`` rates of its grid in
    `liftft.demo.run`.
    """

    base: BaseSettings = field(default_factory=BaseSettings)
    n_target_train: int = 2000
    n_target_test: int = 200
    target_steps: tuple[int, ...] = (2, 3)
    finetune_steps: int = 200
    finetune_batch_size: int = 16
    # Doubling steps: learning and forgetting are fastest early, and the frontier's low-target end is where methods
    # differ most.
    score_at: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1)
    n_scored_target: int = 100
    rates_per_method: int = 2

    def __post_init__(self):
        if not self.score_at or not all(0 < f <= 1 for f in self.score_at):
            raise ValueError(f"score_at must be fractions in (0, 1], got {self.score_at!r}")
        for name in ("n_scored_target", "rates_per_method"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def score_steps(self) -> list[int]:
        """The steps after which each run is scored: ``score_at`` of ``finetune_steps``, rounded, at least 1."""
        return sorted({max(1, round(f * self.finetune_steps)) for f in self.score_at})

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A reduced demo for CI and smoke runs: its numbers are indicative only.

        Its two-layer base learns the facts and the sums but not to read back
        from its prompt, so every method learns the target less.
        """
        base = BaseSettings(
            n_people=16, n_stories=1000, hidden_size=64, intermediate_size=128, num_layers=2, pretrain_steps=1200,
        )  # fmt: skip
        return cls(base=base, n_target_train=1000, n_target_test=100, finetune_steps=200, score_at=(0.5, 1),
                   n_scored_target=50, rates_per_method=1)

    def source_test(self) -> list[dict]:
        """The source questions: every fact the base was taught (kind ``number``)."""
        return make_source(self.base.world())

    def target_split(self, seed: int = 0) -> tuple[list[dict], list[dict]]:
        """Disjoint target train and test word problems for ``seed`` (kind ``number``)."""
        return make_target(
            self.base.world(), seed, self.n_target_train, self.n_target_test, self.target_steps, self.base.max_value
        )


class Base(NamedTuple):
    """A loaded base model; ``pretrain_seconds`` is that of the run that built it."""

    path: Path
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    pretrain_seconds: float
    cached: bool


class _DamagedCache(Exception):
    """A cache entry that cannot be used; the message says why."""


def cache_root() -> Path:
    """$LIFTFT_CACHE, else $XDG_CACHE_HOME/liftft, else ~/.cache/liftft."""
    if os.environ.get("LIFTFT_CACHE"):
        return Path(os.environ["LIFTFT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "liftft"


def base_path(settings: BaseSettings) -> Path:
    """Where the base built from ``settings`` is cached."""
    return cache_root() / "demo-base" / settings.key()


def get_base(settings: BaseSettings, device: str | torch.device = "cpu", progress: bool = True) -> Base:
    """The cached base for ``settings`` on ``device``, pretrained and cached first if missing.

    A damaged cache entry (a file missing, altered or unloadable) is reported
    on stderr and rebuilt. An entry is written to a temporary directory and
    renamed into place, so an interrupted run never leaves half of one behind.
    """
    if not isinstance(settings, BaseSettings):
        raise TypeError(f"settings must be a BaseSettings, got {type(settings).__name__}")
    path = base_path(settings)
    if path.exists():
        try:
            return _load_cached(path, settings, device)
        except _DamagedCache as err:
            print(f"liftft demo: the cached base {path} is damaged ({err}); rebuilding it", file=sys.stderr)
    model, tokenizer, seconds = pretrain(settings, device, progress)
    _write_cache(path, settings, model, tokenizer, seconds)
    return Base(path, model, tokenizer, seconds, cached=False)


def pretrain(settings: BaseSettings, device: str | torch.device = "cpu", progress: bool = True):
    """Train a tokenizer and a fresh Llama on the source domain of ``settings``.

    Returns ``(model, tokenizer, seconds)``; ``model`` is in eval mode on
    ``device`` and ``seconds`` covers the tokenizer, the data and the training.
    """
    start = time.perf_counter()
    records = settings.records()
    tokenizer = build_tokenizer(corpus_texts(records), settings.vocab_size)
    sequences = [encode_record(tokenizer, r) for r in records]
    torch.manual_seed(settings.seed)
    model = build_model(settings, tokenizer, max(map(len, sequences))).to(device)
    train_on_sequences(model, sequences, tokenizer.pad_token_id, settings, device, progress)
    return model.eval(), tokenizer, time.perf_counter() - start


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with <pad>=0, <s>=1, </s>=2 and BOS added.

    Words and the small numbers of the demo become single tokens, so reading a
    number back or adding two is one step for the model. The prompt template's
    fixed text before and after the instruction is one token each: it carries
    no information, and sequence length is what a small model pays for.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(piece, normalized=False) for piece in _template_pieces()])
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _template_pieces() -> list[str]:
    """The prompt template's text before and after the instruction."""
    marker = "INSTRUCTION"
    return build_prompt({"instruction": marker}).split(marker)


def encode_record(tokenizer, record: dict) -> list[int]:
    """Prompt ids (as training and generation make them), response ids, then EOS."""
    prompt_ids = encode_prompt(tokenizer, build_prompt(record))
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    return prompt_ids + response_ids + [tokenizer.eos_token_id]


def build_model(settings: BaseSettings, tokenizer, max_length: int) -> LlamaForCausalLM:
    """A randomly initialised Llama of the size ``settings`` gives."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        # Room for the target domain's longer problems after fine-tuning.
        max_position_embeddings=max(512, 2 * max_length),
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def train_on_sequences(model, sequences, pad_id: int, settings: BaseSettings, device, progress: bool) -> None:
    """Pretrain ``model`` in place on ``sequences`` (lists of token ids) for ``settings.pretrain_steps``
    steps: AdamW with linear warm-up and cosine decay, loss on every token."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, settings.pretrain_steps // 20)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        progress_frac = (step - warmup) / max(1, settings.pretrain_steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress_frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = _length_grouped_batches([len(s) for s in sequences], settings.batch_size, settings.seed)
    bar = progress_bar(range(settings.pretrain_steps), desc="pretraining the demo base", disable=not progress,
                       unit="step")
    for step in bar:
        input_ids, attention_mask, labels = _pad([sequences[i] for i in next(batches)], pad_id, device)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")


def _length_grouped_batches(lengths: list[int], batch_size: int, seed: int):
    """Endless random batches of indices, each drawn from sequences of similar length
    so that little compute goes to padding; every epoch sees every sequence once."""
    generator = torch.Generator().manual_seed(seed)
    pool = batch_size * 32
    while True:
        order = torch.randperm(len(lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())


def _pad(batch: list[list[int]], pad_id: int, device):
    """Right-padded ids, their attention mask and labels with padding ignored."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def _write_cache(path: Path, settings: BaseSettings, model, tokenizer, seconds: float) -> None:
    """Save into a temporary sibling directory, record file hashes, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        meta = {"settings": asdict(settings), "version": CACHE_VERSION, "pretrain_seconds": seconds, "files": files}
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _load_cached(path: Path, settings: BaseSettings, device) -> Base:
    """Load the entry at ``path`` after checking it is complete, unaltered and for ``settings``."""
    try:
        meta = json.loads((path / _MARKER).read_text())
        files = meta["files"]
    except FileNotFoundError:
        raise _DamagedCache(f"{_MARKER} is missing") from None
    except (ValueError, KeyError, TypeError) as err:
        raise _DamagedCache(f"{_MARKER} is unreadable: {err}") from None
    if meta.get("settings") != asdict(settings) or meta.get("version") != CACHE_VERSION:
        raise _DamagedCache("it was built from other settings")
    if "model.safetensors" not in files:
        raise _DamagedCache("it lists no model.safetensors")
    for name, digest in files.items():
        if not (path / name).is_file():
            raise _DamagedCache(f"{name} is missing")
        if _sha256(path / name) != digest:
            raise _DamagedCache(f"{name} does not match its recorded hash")
    try:
        model = LlamaForCausalLM.from_pretrained(path).to(device)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise _DamagedCache(f"it does not load: {err}") from None
    return Base(path, model.eval(), tokenizer, meta["pretrain_seconds"], cached=True)


def _sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
