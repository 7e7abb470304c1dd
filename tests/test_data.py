"""grootl.data: Alpaca loading and checks, prompt templates, tokenisation report, batching."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from grootl.data import (
    IGNORE_INDEX, DataError, EpochSampler, SFTCollator, get_template, load_records, make_dataloader, tokenize_records,
)
from grootl.data.alpaca import DROP_EMPTY_OUTPUT, DROP_LONG_PROMPT
from grootl.paths import is_local_path

from conftest import ASSETS

ALPACA = ASSETS / "alpaca_tiny.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ASSETS / "tokenizer")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_shipped_sample_is_realistic_alpaca():
    records = [json.loads(line) for line in ALPACA.read_text().splitlines()]
    assert len(records) >= 200
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in records)
    with_input = sum(bool(r["input"]) for r in records)
    assert 0.2 * len(records) < with_input < 0.8 * len(records)
    assert len({r["instruction"] for r in records}) > 150


def test_shipped_tokenizer_matches_gpt_neox_conventions(tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
    text = "### Instruction:\nName the capital of Japan.\n\n### Response:The capital of Japan is Tokyo."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < 0.75 * len(text)  # byte-level round trip, real merges


def test_grootl_template_matches_the_published_code():
    template = get_template("grootl")
    assert template.format("Add the numbers.") == "### Instruction:\nAdd the numbers.\n\n### Response:"
    assert (template.format("Add the numbers.", "2 and 3")
            == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:")
    assert template.format("Add the numbers.", "   ") == template.format("Add the numbers.")
    inline = get_template("grootl-inline")
    assert inline.format("Add.", "2 and 3") == "### Instruction:\nAdd.\n2 and 3\n\n### Response:"
    assert inline.format("Add.") == template.format("Add.")
    assert get_template("alpaca").format("Add.").startswith("Below is an instruction")
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'.*grootl"):
        get_template("chatml")


def test_every_local_format_loads_the_same_records(tmp_path):
    reference = load_records(ALPACA)
    rows = reference.to_list()
    (tmp_path / "a.json").write_text(json.dumps(rows))
    reference.to_parquet(str(tmp_path / "a.parquet"))
    reference.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": reference}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("a.json", "a.parquet", "saved", "saved_dict"):
        assert load_records(tmp_path / source).to_list() == rows, source


def test_hub_ids_go_to_load_dataset(monkeypatch):
    calls = []
    records = datasets.Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": "Hi."}])

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        return records

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("tatsu-lab/alpaca").to_list() == records.to_list()
    assert calls == [("tatsu-lab/alpaca", "train")]


@pytest.mark.parametrize("name, local", [
    ("tatsu-lab/alpaca", False), ("state-spaces/mamba-1.4b-hf", False), ("org_1/model.v2", False),  # owner/name
    ("./data", True), ("../data", True), ("/abs/data", True), ("~/data", True), (".hidden/x", True),  # leading . / ~
    ("alpaca", True), ("a/b/c", True), ("a/", True), ("a b/c", True), ("C:\\data", True), ("C:/data", True),
    ("data/train.jsonl", True), ("org/set.JSON", True), ("org/set.parquet", True),  # a data file, not a repo
    ("org/here", True), ("org/typo", True),  # exists under the base folder, or its folder does
])
def test_is_local_path(tmp_path, monkeypatch, name, local):
    (tmp_path / "org/here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path.parent)
    assert is_local_path(name, tmp_path) is local
    assert is_local_path(name) is (local and name not in ("org/here", "org/typo"))  # base: the current directory


def test_missing_local_sources_are_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: pytest.fail("asked the hub"))
    monkeypatch.chdir(tmp_path)
    for name in ("alpaca_data", "runs/x/data", "data/train.jsonl", "./saved"):
        with pytest.raises(DataError, match=f"{name.removeprefix('./')}: no such file or folder"):
            load_records(name)


def test_record_missing_output_names_file_and_record(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "A.", "input": "", "output": "a"},
        {"instruction": "B.", "input": "", "output": "b"},
        {"instruction": "C.", "input": ""},
    ])
    with pytest.raises(DataError, match=r"bad\.jsonl: record 3 is missing 'output'"):
        load_records(path)


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"instruction": "A.", "response": "a"}], r"no \['output'\] field"),
        ([{"instruction": "A.", "output": 3}], r"record 1 field 'output' must be text, got int"),
        ([{"instruction": None, "output": "a"}], r"record 1 is missing 'instruction'"),
    ],
)
def test_malformed_records_are_named(tmp_path, records, message):
    with pytest.raises(DataError, match=message):
        load_records(write_jsonl(tmp_path / "bad.jsonl", records))


def test_unreadable_sources_are_named(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_records(tmp_path / "notes.txt")


GOOD_LINE = '{"instruction": "A.", "output": "a"}\n'


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.jsonl", "", "empty.jsonl: the file is empty"),
        ("blank.json", "\n  \n", "blank.json: the file is empty"),
        ("none.json", "[]", "none.json: holds no records"),
        ("broken.jsonl", GOOD_LINE * 2 + '{"instruction": "C.", "output": \n' + GOOD_LINE,
         r"broken.jsonl: line 3: not valid JSON \(Expecting value at column 33\)"),
        ("gap.jsonl", GOOD_LINE + "\n" + "{'instruction': 'B.'}\n", r"gap.jsonl: line 3: not valid JSON"),
        ("list.jsonl", GOOD_LINE + '["B.", "b"]\n', r"list.jsonl: line 2: a JSON list, not a record"),
        ("array.json", '[{"instruction": "A.", "output": "a"},\n {"instruction": "B." "output": "b"}]',
         r"array.json: line 2, column 23: not valid JSON \(Expecting ',' delimiter\)"),
    ],
)
def test_unreadable_json_names_file_and_line(tmp_path, capfd, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message) as error:
        load_records(tmp_path / name)
    assert "\n" not in str(error.value)
    assert capfd.readouterr().err == ""  # no second report (datasets logs a 0-based row)


def test_tokenisation_masks_the_prompt_and_ends_with_eos(tokenizer):
    records = datasets.Dataset.from_list([
        {"instruction": "Name the capital of Japan.", "input": "", "output": "Tokyo."},
        {"instruction": "Add the numbers.", "input": "17 and 25", "output": "42."},
    ])
    rows, report = tokenize_records(records, tokenizer, "grootl", max_length=512)
    for row, record in zip(rows, records):
        prompt = get_template("grootl").format(record["instruction"], record["input"])
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        output_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt_ids + output_ids + [tokenizer.eos_token_id]
        assert row["context_len"] == len(prompt_ids) and row["length"] == len(row["input_ids"])
    assert (report.total, report.kept, report.trimmed, report.dropped) == (2, 2, 0, {})


def test_report_counts_kept_trimmed_and_dropped(tokenizer):
    long_prompt = "Explain this. " * 40
    records = datasets.Dataset.from_list([
        {"instruction": "Say hi.", "input": "", "output": "Hi."},  # fits
        {"instruction": "Say hi.", "input": "", "output": "Hello there, " * 30},  # trimmed
        {"instruction": "Say nothing.", "input": "", "output": "  "},  # dropped: empty output
        {"instruction": long_prompt, "input": "", "output": "Ok."},  # dropped: prompt too long
    ])
    rows, report = tokenize_records(records, tokenizer, "grootl", max_length=48)
    assert (report.total, report.kept, report.trimmed) == (4, 2, 1)
    assert report.dropped == {DROP_EMPTY_OUTPUT: 1, DROP_LONG_PROMPT: 1}
    assert max(rows["length"]) == 48 and rows[1]["context_len"] < 48
    text = str(report)
    assert "4 records: 2 kept (1 trimmed to max_length 48), 2 dropped" in text and "empty output" in text


def test_small_data_loads_and_tokenizes_without_progress_bars(tokenizer, capfd, monkeypatch):
    records = datasets.Dataset.from_list(load_records(ALPACA).to_list())  # in memory: map() caches nothing
    tokenize_records(records, tokenizer)
    assert capfd.readouterr().err == ""
    # Past the size where they help, the bars show (the datasets default is left as it was).
    monkeypatch.setattr("grootl.data.alpaca.LARGE_RECORD_COUNT", 10)
    tokenize_records(records, tokenizer)
    assert "Tokenizing" in capfd.readouterr().err and datasets.is_progress_bar_enabled()


def test_collator_pads_right_and_labels_only_the_response():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "context_len": 3}, {"input_ids": [5, 6, 7], "context_len": 1}]
    batch = SFTCollator(pad_token_id=1)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 3 + [8, 9], [IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["context_lens"].tolist() == [3, 1]
    assert SFTCollator(pad_token_id=1, pad_to_multiple_of=4)(rows)["input_ids"].shape == (2, 8)


def test_sampler_is_a_seeded_permutation_per_epoch():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    sampler = EpochSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(200)) and list(EpochSampler(lengths, 8, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(200))


def test_length_grouping_cuts_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]

    def padding(order):
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    grouped = padding(list(EpochSampler(lengths, 8, seed=0, group_by_length=True)))
    shuffled = padding(list(EpochSampler(lengths, 8, seed=0, group_by_length=False)))
    assert grouped < 0.25 * shuffled


def test_dataloader_batches_carry_context_lens(tokenizer):
    rows, _ = tokenize_records(load_records(ALPACA).select(range(12)), tokenizer, "grootl", max_length=128)
    batch = next(iter(make_dataloader(rows, 4, tokenizer.pad_token_id, seed=0)))
    assert batch["input_ids"].shape[0] == 4 and batch["context_lens"].dtype == torch.long
    for labels, context in zip(batch["labels"], batch["context_lens"]):
        assert (labels[:context] == IGNORE_INDEX).all() and labels[context] != IGNORE_INDEX
