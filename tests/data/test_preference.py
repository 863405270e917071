"""Preference pairs: shared prompt, loss only on answers, leading dim 2, bad records counted or raised."""
import json

import pytest
import torch

from tests.harness.text_data import tiny_tokenizer, tiny_tokenizer_dir
from tinyllm_mcore.data.preference import PreferenceDataset
from tinyllm_mcore.data.preprocess import preprocess


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


PAIRS = [
    {"prompt": "天下大事", "chosen": "分久必合，合久必分", "rejected": "不知道"},
    {"prompt": "问题二", "chosen": "好", "rejected": "坏的回答很长很长", "system": "你是评审。"},
]


def test_pair_format_shared_prompt_and_answer_masks(tmp_path):
    tok = tiny_tokenizer()
    dataset = PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", PAIRS), tok, seq_length=96, seed=None)
    assert len(dataset) == 2
    for idx, record in enumerate(PAIRS):
        pair = dataset[idx]
        assert {k: (v.shape, v.dtype) for k, v in pair.items()} == {
            "tokens": ((2, 96), torch.int64), "labels": ((2, 96), torch.int64),
            "loss_mask": ((2, 96), torch.float32), "position_ids": ((2, 96), torch.int64),
            "segment_ids": ((2, 96), torch.int64)}
        prompt = tok.chat_prompt_ids([{"role": "user", "content": record["prompt"]}], record.get("system"))
        for row, answer in ((0, record["chosen"]), (1, record["rejected"])):
            n = len(prompt) + len(tok.tokenize(answer)) + 1
            assert pair["tokens"][row][:len(prompt)].tolist() == prompt  # same chat prompt for both answers
            assert pair["labels"][row][pair["loss_mask"][row] == 1].tolist() == tok.tokenize(answer) + [tok.eos]
            assert torch.equal(pair["labels"][row][:n - 1], pair["tokens"][row][1:n])
            assert torch.equal(pair["position_ids"][row][:n], torch.arange(n))
            assert pair["segment_ids"][row][:n].eq(1).all() and pair["segment_ids"][row][n:].eq(0).all()
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    assert batch["tokens"].shape == (2, 2, 96)  # [micro batch, chosen/rejected, seq]


def test_missing_fields_are_counted_and_all_bad_raises(tmp_path):
    tok = tiny_tokenizer()
    records = PAIRS + [{"prompt": "缺", "chosen": "有"}, {"prompt": "空", "chosen": "有", "rejected": " "},
                       {"prompt": "数", "chosen": 1, "rejected": "x"}]
    dataset = PreferenceDataset(write_jsonl(tmp_path / "p.jsonl", records), tok, seq_length=96)
    assert len(dataset) == 2
    assert (dataset.stats["skipped_missing_key"], dataset.stats["skipped_empty_text"],
            dataset.stats["skipped_not_string"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="skipped_missing_key=1"):
        PreferenceDataset(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "缺", "chosen": "有"}]), tok, 96)


def test_overflow_truncate_or_drop(tmp_path):
    tok = tiny_tokenizer()
    long_pair = {"prompt": "短", "chosen": "长" * 200, "rejected": "短答"}
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS + [long_pair, {"prompt": "问" * 300, "chosen": "a", "rejected": "b"}])
    seq = 96
    truncated = PreferenceDataset(path, tok, seq_length=seq, seed=None)
    assert (truncated.stats["truncated"], truncated.stats["dropped_prompt_too_long"], len(truncated)) == (1, 1, 3)
    pair = truncated[2]
    assert pair["segment_ids"][0].eq(1).all() and pair["loss_mask"][0][-1] == 0  # cut: last label unknown
    assert pair["loss_mask"][1].sum() == len(tok.tokenize("短答")) + 1
    dropped = PreferenceDataset(path, tok, seq_length=seq, overflow="drop")
    assert (dropped.stats["dropped_too_long"], len(dropped)) == (2, 2)


def test_indexed_source_gives_the_same_pairs(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS * 3)
    result = preprocess(path, str(tmp_path / "pref"), str(tiny_tokenizer_dir()), mode="preference", progress=False)
    from_jsonl, from_index = PreferenceDataset(path, tok, 64, seed=3), PreferenceDataset(result.prefixes[0], tok, 64, seed=3)
    assert len(from_index) == len(from_jsonl) == 6
    for i in range(6):
        assert all(torch.equal(from_jsonl[i][k], from_index[i][k]) for k in from_jsonl[i])


def test_build_preference_datasets_splits_disjointly(tmp_path):
    from tinyllm_mcore.data.preference import build_preference_datasets

    tok = tiny_tokenizer()
    records = [{"prompt": f"问{i}", "chosen": f"好{i}", "rejected": f"坏{i}"} for i in range(40)]
    train, valid, test = build_preference_datasets(write_jsonl(tmp_path / "p.jsonl", records), tok, 64,
                                                   split="80,20,0", seed=9)
    assert test is None and (len(train), len(valid)) == (32, 8)
    prompts = lambda ds: {tok.detokenize(ds[i]["tokens"][0][ds[i]["loss_mask"][0] == 0].tolist()) for i in range(len(ds))}
    assert not prompts(train) & prompts(valid)


def test_degenerate_pairs_are_dropped_and_counted(tmp_path):
    """Issue 12 item 14: chosen == rejected, or equal once truncated, trained as ties (zero margin, noise)."""
    tok = tiny_tokenizer()
    same_start = "分久必合，合久必分" * 4
    records = PAIRS + [{"prompt": "问", "chosen": "一样的回答", "rejected": " 一样的回答 "},
                       {"prompt": "长", "chosen": same_start + "甲", "rejected": same_start + "乙乙"}]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    prompt = len(tok.chat_prompt_ids([{"role": "user", "content": "长"}]))
    seq = prompt + len(tok.tokenize(same_start)) - 2  # both long answers cut inside their common start
    dataset = PreferenceDataset(path, tok, seq_length=seq, seed=None)
    assert dataset.stats["dropped_identical"] == 1 and dataset.stats["dropped_identical_after_truncation"] == 1
    assert len(dataset) == 2
    roomy = PreferenceDataset(path, tok, seq_length=256, seed=None)  # untruncated, the long pair differs
    assert (roomy.stats["dropped_identical"], roomy.stats["dropped_identical_after_truncation"], len(roomy)) == (1, 0, 3)
    for i in range(len(roomy)):
        pair = roomy[i]
        assert not torch.equal(pair["tokens"][0], pair["tokens"][1])
    with pytest.raises(ValueError, match="no usable preference pair.*dropped_identical=1"):
        PreferenceDataset(write_jsonl(tmp_path / "same.jsonl", records[2:3]), tok, seq_length=64)
