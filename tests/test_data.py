"""Tests of liftft.data.batches: loading, label masks at the seam, EOS under truncation, batching."""

from __future__ import annotations

import json
import re

import datasets
import pytest
import torch
from conftest import data_path, full_data_path, math_records, sentencepiece_style, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from liftft.data.batches import DataCollator, encode_dataset, encode_example, load_records, split_validation
from liftft.data.records import parse_columns
from liftft.data.template import build_prompt, encode_prompt

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def seam_tokenizer():
    """One token per byte, except that "\\n\\n" merges into a single token.

    No pre-tokenizer splits the text, so a prompt ending in "\\n" followed by a
    response starting with "\\n" merges across the seam when tokenized together.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", *alphabet, "ĊĊ"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def seam_token_count(text: str) -> int:
    """Tokens the seam tokenizer makes of ``text`` (no BOS), counted by hand: bytes minus merged newline pairs."""
    return len(text.encode()) - sum(len(run) // 2 for run in re.findall("\n+", text))


def record(instruction="Add 2 and 3.", output="The answer is 5.", **extra):
    return {"instruction": instruction, "output": output, **extra}


# ------------------------------------------------------------- the seam


def test_label_mask_is_exact_where_the_seam_merges(seam_tokenizer):
    tok = seam_tokenizer
    rec = load_records(str(data_path("train", "math_data.json")))[0]
    prompt, output = build_prompt(rec), rec["output"]
    assert prompt.endswith("\n") and output.startswith("\n")
    newline, double_newline = tok.convert_tokens_to_ids(["Ċ", "ĊĊ"])
    prompt_ids = encode_prompt(tok, prompt)
    assert len(prompt_ids) == 1 + seam_token_count(prompt)

    # The naive way: tokenize prompt + response together and mask as many
    # tokens as the prompt has alone. The seam merged, so it is off by one.
    full = tok(prompt + output)["input_ids"]
    assert full[len(prompt_ids) - 1] == double_newline
    naive_targets = full[len(prompt_ids) :]
    assert len(naive_targets) == seam_token_count(output) - 1
    assert tok.decode(naive_targets) == output[1:] != output

    ex = encode_example(rec, tok, max_seq_len=4096)
    ids, labels = ex["input_ids"], ex["labels"]
    n_prompt = len(prompt_ids)
    assert ids[:n_prompt] == prompt_ids
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt] == newline
    assert labels[n_prompt:] == ids[n_prompt:]
    assert len(ids) == 1 + seam_token_count(prompt) + seam_token_count(output) + 1
    assert tok.decode(labels[n_prompt:-1]) == output
    assert labels[-1] == ids[-1] == EOS


def check_labels_decode_to_the_outputs(records, tokenizer):
    """Records 170..179 of the paper's math training file, whose 175 has an empty output: skipped, not an error."""
    assert len(records) == 10 and records[5]["output"] == ""
    examples, stats = encode_dataset(records, tokenizer, max_seq_len=2048)
    assert stats == {"examples": 9, "truncated": 0, "skipped": 1, "empty": 1, "no_context": 0}
    for rec, ex in zip(records[:5] + records[6:], examples):
        n_prompt = len(encode_prompt(tokenizer, build_prompt(rec)))
        assert ex["labels"][:n_prompt] == [-100] * n_prompt
        assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
        assert tokenizer.decode(ex["labels"][n_prompt:-1]) == rec["output"]
        assert ex["labels"][-1] == tokenizer.eos_token_id


def test_labels_decode_to_the_output_on_the_math_excerpt(tokenizer):
    records = load_records(str(data_path("train", "math_data.json")))
    with open(data_path("train", "math_data.json")) as f:
        assert records == json.load(f)
    check_labels_decode_to_the_outputs(records[-10:], tokenizer)  # the excerpt ends with records 170..179


def test_labels_decode_to_the_output_on_the_real_math_file(tokenizer):
    records = load_records(str(full_data_path("train", "math_data.json")))
    with open(full_data_path("train", "math_data.json")) as f:
        raw = json.load(f)
    assert records == raw and len(records) == 3260
    check_labels_decode_to_the_outputs(records[170:180], tokenizer)


@pytest.mark.parametrize("style", ["metaspace", "prepend"])
def test_no_spurious_word_boundary_before_the_response_with_sentencepiece_style_tokenizers(style):
    # Tokenized alone, "\nA: x" would begin with a "▁" token; after the prompt it does not.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "A": 4, ":": 5, "\n": 6, "x": 7, "▁x": 8}
    tok = sentencepiece_style(models.BPE(vocab=vocab, merges=[("▁", "x")], unk_token="<unk>"), style)
    assert tok.convert_ids_to_tokens(tok("\nA: x", add_special_tokens=False)["input_ids"])[0] == "▁"

    labels = encode_example(record(output="\nA: x"), tok)["labels"]
    assert tok.convert_ids_to_tokens([i for i in labels if i != -100]) == ["\n", "A", ":", "▁x", "</s>"]


# ---------------------------------------------------- EOS and truncation


def test_eos_survives_truncation_of_the_prompt(seam_tokenizer):
    rec = record(instruction=" ".join(["word"] * 50), output="The answer is 7.")
    ex = encode_example(rec, seam_tokenizer, max_seq_len=40)
    ids, labels = ex["input_ids"], ex["labels"]
    # 16 response tokens + EOS leave BOS and the prompt's last 22 tokens.
    assert len(ids) == len(labels) == 40
    assert ids[0] == BOS and ids[-1] == EOS and labels[-1] == EOS
    assert labels[:23] == [-100] * 23
    assert seam_tokenizer.decode(ids[1:23]) == "rd word\n\n### Response:\n"
    assert seam_tokenizer.decode(labels[23:-1]) == "The answer is 7."


def test_an_example_that_fits_exactly_is_not_truncated(seam_tokenizer):
    rec = record()
    exact = 1 + seam_token_count(build_prompt(rec)) + seam_token_count(rec["output"]) + 1
    _, fits = encode_dataset([rec], seam_tokenizer, max_seq_len=exact)
    _, cut = encode_dataset([rec], seam_tokenizer, max_seq_len=exact - 1)
    assert fits == {"examples": 1, "truncated": 0, "skipped": 0, "empty": 0, "no_context": 0}
    assert cut == {"examples": 1, "truncated": 1, "skipped": 0, "empty": 0, "no_context": 0}


def test_skips_when_response_leaves_no_room_for_the_response_cue(seam_tokenizer):
    # At 60 tokens, BOS + "### Response:\n" (14) + EOS leave 44 response tokens.
    longest = record(output="y" * 44)
    too_long = record(output="y" * 45)
    ex = encode_example(longest, seam_tokenizer, max_seq_len=60)
    assert len(ex["input_ids"]) == 60
    assert seam_tokenizer.decode(ex["input_ids"][:15]) == "<s>### Response:\n"
    assert encode_example(too_long, seam_tokenizer, max_seq_len=60) is None

    records = [record(), longest, too_long, record(output=" \n"), record()]
    examples, stats = encode_dataset(records, seam_tokenizer, max_seq_len=60)
    assert stats == {"examples": 3, "truncated": 3, "skipped": 2, "empty": 1, "no_context": 0}
    assert all(ex["input_ids"][-1] == EOS for ex in examples)


def test_empty_output_is_skipped(seam_tokenizer):
    assert encode_example(record(output=""), seam_tokenizer) is None


def test_nothing_left_after_filtering_is_an_error(seam_tokenizer):
    with pytest.raises(ValueError, match="empty dataset after filtering.*1 with a blank response.*1 whose last "
                                         "response.*max_seq_len=20"):
        encode_dataset([record(output="y" * 30), record(output="")], seam_tokenizer, max_seq_len=20)
    with pytest.raises(ValueError, match="empty dataset"):
        encode_dataset([], seam_tokenizer)


def test_bad_encoding_arguments(seam_tokenizer):
    with pytest.raises(TypeError, match="max_seq_len"):
        encode_example(record(), seam_tokenizer, max_seq_len=12.5)
    with pytest.raises(ValueError, match="max_seq_len"):
        encode_example(record(), seam_tokenizer, max_seq_len=1)
    with pytest.raises(ValueError, match="unknown template"):
        encode_example(record(), seam_tokenizer, template="vicuna")


# ------------------------------------------------------- input section


@pytest.mark.parametrize(
    "extra, shown",
    [({}, False), ({"input": ""}, False), ({"input": None}, False), ({"input": "  \n"}, False), ({"input": "x = 4"}, True)],
)
def test_input_section_appears_exactly_when_input_is_non_empty(tokenizer, extra, shown):
    ex = encode_example(record(**extra), tokenizer)
    text = tokenizer.decode(ex["input_ids"])
    assert text.count("### Input:") == int(shown)
    assert ("### Input:\nx = 4\n\n### Response:\n" in text) == shown


# ------------------------------------------------------------- batching


def test_collator_masks_padding_by_length_when_pad_is_eos():
    collate = DataCollator(pad_token_id=EOS)
    batch = collate(
        [
            {"input_ids": [BOS, 5, 6, 7, EOS], "labels": [-100, -100, 6, 7, EOS]},
            {"input_ids": torch.tensor([BOS, 8, EOS]), "labels": torch.tensor([-100, 8, EOS])},
        ]
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[BOS, 5, 6, 7, EOS], [BOS, 8, EOS, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7, EOS], [-100, 8, EOS, -100, -100]]


def test_collator_rejects_bad_input():
    with pytest.raises(TypeError, match="pad_token_id"):
        DataCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="example 1"):
        DataCollator(0)([{"input_ids": [1], "labels": [1]}, {"input_ids": [1, 2], "labels": [2]}])


def test_collator_works_as_trainer_data_collator(tokenizer, tmp_path):
    from transformers import Trainer, TrainingArguments

    examples, _ = encode_dataset(math_records(4), tokenizer, max_seq_len=256)
    collate = DataCollator(tokenizer.pad_token_id)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
    trainer = Trainer(model=tiny_llama(), args=args, data_collator=collate)
    batch = next(iter(trainer.get_eval_dataloader(datasets.Dataset.from_list(examples))))
    expected = collate(examples)
    assert all(torch.equal(batch[key], expected[key]) for key in expected)
    assert torch.isfinite(trainer.model(**batch).loss)


# ----------------------------------------------------------- splitting


def test_split_validation_is_a_deterministic_disjoint_holdout():
    records = list(range(20))
    train, val = split_validation(records, 5, seed=3)
    assert (train, val) == split_validation(records, 5, seed=3)
    assert len(val) == 5 and sorted(train + val) == records
    assert train == sorted(train) and val == sorted(val)
    assert split_validation(records, 0, seed=3) == (records, [])


@pytest.mark.parametrize("size, error", [(-1, ValueError), (3, ValueError), (1.0, TypeError), (True, TypeError)])
def test_split_validation_rejects_bad_sizes(size, error):
    with pytest.raises(error, match="val.size"):
        split_validation([1, 2, 3], size, seed=0)


# ------------------------------------------------------------- loading


@pytest.fixture
def isolated_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def sample_records():
    return math_records(3) + [{"instruction": "Summarize.", "input": "Some context.", "output": "Short."}]


def test_json_jsonl_and_datasets_directories_give_the_same_records(tmp_path, isolated_datasets_cache):
    recs = sample_records()
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    datasets.Dataset.from_list(recs).save_to_disk(tmp_path / "saved")
    datasets.DatasetDict(train=datasets.Dataset.from_list(recs)).save_to_disk(tmp_path / "saved_dict")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text((tmp_path / "a.jsonl").read_text())

    for source in ["a.json", "a.jsonl", "saved", "saved_dict", "files"]:
        assert load_records(str(tmp_path / source)) == recs, source
    assert load_records([tmp_path / "a.json", str(tmp_path / "saved")]) == recs + recs


def test_missing_input_becomes_empty_and_extra_fields_are_kept(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([record(answer="5"), record(input=None, id=7)]))
    assert load_records(str(tmp_path / "d.json")) == [record(answer="5", input=""), record(input="", id=7)]


def test_hub_names_load_the_split_and_config_asked_for(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([record()])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("someone/math") == [record(input="")]
    assert load_records("someone/math", split="test", config="main") == [record(input="")]
    assert calls == [("someone/math", None, "train"), ("someone/math", "main", "test")]


def test_parquet_csv_json_and_json_lines_files_give_the_same_records(tmp_path, isolated_datasets_cache):
    # A CSV cell is a string: the answers are strings here, absent ones empty.
    recs = [{**r, "answer": str(r.get("answer", ""))} for r in sample_records()]
    recs[0]["output"] = ""  # kept, for encode_dataset to count as empty
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    datasets.Dataset.from_list(recs).to_parquet(tmp_path / "a.parquet")
    datasets.Dataset.from_list(recs).to_csv(tmp_path / "a.csv", index=False)
    assert any("\n" in r["output"] for r in recs), "precondition: CSV cells hold newlines"
    for name in ["a.json", "a.jsonl", "a.parquet", "a.csv"]:
        assert load_records(tmp_path / name) == recs, name


def test_a_broken_parquet_file_is_named(tmp_path, isolated_datasets_cache):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=re.escape(f"cannot read {path} as parquet")):
        load_records(path)


def test_splits_of_saved_datasets_and_data_file_directories(tmp_path, isolated_datasets_cache):
    train, test = [record(output="train")], [record(output="test")]
    datasets.DatasetDict(train=datasets.Dataset.from_list(train), test=datasets.Dataset.from_list(test)).save_to_disk(
        tmp_path / "saved")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text(json.dumps(train[0]))
    (tmp_path / "files" / "test.jsonl").write_text(json.dumps(test[0]))
    for source in ["saved", "files"]:
        assert load_records(tmp_path / source) == [record(output="train", input="")], source
        assert load_records(tmp_path / source, split="test") == [record(output="test", input="")], source
    with pytest.raises(ValueError, match="no 'validation' split.*train, test"):
        load_records(tmp_path / "saved", split="validation")
    with pytest.raises(ValueError, match="no configurations"):
        load_records(tmp_path / "saved", config="main")
    (tmp_path / "a.json").write_text(json.dumps(train))
    with pytest.raises(ValueError, match="single data file, which has no splits"):
        load_records(tmp_path / "a.json", split="test")


def test_columns_fill_fields_from_other_columns(tmp_path, isolated_datasets_cache):
    rows = [{"question": "Add 2 and 3.", "solution": "It is 5.", "answer": "5"},
            {"question": "Add 1 and 1.", "solution": "It is 2.", "answer": "2"}]
    expected = [{"instruction": r["question"], "output": r["solution"], "answer": r["answer"], "input": ""}
                for r in rows]
    columns = parse_columns(" instruction = question , output=solution")
    assert columns == {"instruction": "question", "output": "solution"}
    (tmp_path / "q.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    for source in ["q.json", "saved"]:
        assert load_records(tmp_path / source, columns=columns) == expected, source
    # One column may fill two fields; the column itself is gone either way.
    both = load_records(tmp_path / "q.json",
                        columns={"instruction": "question", "output": "answer", "answer": "answer"})
    assert both[0] == {"instruction": "Add 2 and 3.", "output": "5", "answer": "5", "solution": "It is 5.", "input": ""}
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'saved'} has no column 'prompt'; its columns: "
                                                   "question, solution, answer")):
        load_records(tmp_path / "saved", columns={"instruction": "prompt"})
    for spec, complaint in [("instruction", "not FIELD=COLUMN"), ("instruction=a,instruction=b", "mapped twice"),
                            ("question=instruction", "unknown field 'question'"), (" , ", "maps no field")]:
        with pytest.raises(ValueError, match=complaint):
            parse_columns(spec)


# ----------------------------------------------------------- bad input


def test_missing_data_file(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([record()]))
    for missing in [tmp_path / "nope.json", "data/nope.jsonl", "./nope"]:
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            load_records([str(good), str(missing)])


def test_invalid_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]')
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2 column 22")):
        load_records(str(path))


def test_invalid_json_lines_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "x", "output": }\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 3 column 32")):
        load_records(str(path))


@pytest.mark.parametrize(
    "bad, complaint",
    [
        ({"output": "b"}, "'instruction'"),
        ({"instruction": "   ", "output": "b"}, "'instruction'"),
        ({"instruction": "a"}, "'output'"),
        ({"instruction": "a", "output": 5}, "'output'"),
        ({"instruction": "a", "output": "b", "input": 3}, "'input'"),
        ("just text", "must be an object"),
    ],
)
def test_bad_record_names_file_and_index(tmp_path, bad, complaint):
    path = tmp_path / "recs.json"
    path.write_text(json.dumps([record(), record(), bad]))
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 2") + ".*" + re.escape(complaint)):
        load_records(str(path))


def test_bad_record_in_json_lines_and_datasets_directory(tmp_path):
    recs = [record(), {"instruction": "a", "output": None}]
    path = tmp_path / "recs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 1") + ".*'output'"):
        load_records(str(path))
    datasets.Dataset.from_list(recs).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'saved'}: record 1") + ".*'output'"):
        load_records(str(tmp_path / "saved"))


@pytest.mark.parametrize("name, text", [("e.json", "[]"), ("blank.json", " \n"), ("e.jsonl", "\n\n")])
def test_empty_dataset(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match="empty dataset: " + re.escape(str(path))):
        load_records(str(path))


def test_other_malformed_sources(tmp_path):
    with pytest.raises(ValueError, match="no data files"):
        load_records([])
    (tmp_path / "obj.json").write_text(json.dumps(record()))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "obj.json")) + ".*JSON list"):
        load_records(str(tmp_path / "obj.json"))
    datasets.DatasetDict(test=datasets.Dataset.from_list([record()])).save_to_disk(tmp_path / "no_train")
    with pytest.raises(ValueError, match="no 'train' split"):
        load_records(str(tmp_path / "no_train"))
