"""SFT samples: loss only on answers, truncation/drop accounting, packing with per-conversation semantics intact."""
import json

import pytest
import torch

from tests.harness.text_data import random_text, tiny_tokenizer, tiny_tokenizer_dir
from tinyllm_mcore.data.preprocess import preprocess
from tinyllm_mcore.data.sft_samples import SFTDataset, packed_attention_mask

KEYS = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32, "position_ids": torch.int64,
        "segment_ids": torch.int64}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def random_conversations(n, seed=0):
    import random
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if i % 3 == 0:
            records.append({"messages": [{"role": "user", "content": random_text(rng, 2, 20)},
                                         {"role": "assistant", "content": random_text(rng, 2, 20)},
                                         {"role": "user", "content": random_text(rng, 2, 20)},
                                         {"role": "assistant", "content": random_text(rng, 2, 20)}],
                            "system": "简短"})
        else:
            records.append({"question": random_text(rng, 2, 30), "answer": random_text(rng, 2, 30)})
    return records


def test_sample_format_and_loss_only_on_answers(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"question": "天下大事", "answer": "分久必合"},
        {"messages": [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": "第一问"},
                      {"role": "assistant", "content": "第一答"}, {"role": "user", "content": "第二问"},
                      {"role": "assistant", "content": "第二答"}]},
    ])
    dataset = SFTDataset(path, tok, seq_length=160, pack=False, seed=None)
    assert len(dataset) == 2
    for sample in (dataset[0], dataset[1]):
        assert {k: v.dtype for k, v in sample.items()} == KEYS
        assert all(v.shape == (160,) for v in sample.values())
    single, multi = dataset[0], dataset[1]
    trained = single["labels"][single["loss_mask"] == 1].tolist()
    assert trained == tok.tokenize("分久必合") + [tok.eos]
    trained = multi["labels"][multi["loss_mask"] == 1].tolist()
    assert trained == tok.tokenize("第一答") + [tok.eos] + tok.tokenize("第二答") + [tok.eos]
    # nothing of the system / user side is trained, and the prompt is the seed's chat format
    n = int((single["segment_ids"] == 1).sum())
    assert tok.detokenize(single["tokens"][:n].tolist()).startswith(
        "<|system|>\n你是由wdndev开发的个人助手。\n<|user|>\n天下大事\n<|assistant|>\n")
    assert torch.equal(single["labels"][:n - 1], single["tokens"][1:n])
    assert single["labels"][n - 1] == 0 and single["loss_mask"][n - 1:].sum() == 0
    assert torch.equal(single["position_ids"][:n], torch.arange(n)) and single["segment_ids"][n:].sum() == 0
    assert (single["tokens"][n:] == tok.pad).all()


def test_overflow_truncate_or_drop_is_counted(tmp_path):
    tok = tiny_tokenizer()
    records = random_conversations(30, seed=1) + [{"question": "问"}]  # + one malformed record
    path = write_jsonl(tmp_path / "sft.jsonl", records)
    seq = 96
    full = SFTDataset(path, tok, seq_length=4096, pack=False, seed=None)
    lengths = [int((full[i]["segment_ids"] == 1).sum()) for i in range(len(full))]
    n_long = sum(length > seq for length in lengths)
    assert 0 < n_long < 30

    dropped = SFTDataset(path, tok, seq_length=seq, pack=False, overflow="drop")
    assert dropped.stats["dropped_too_long"] == n_long and len(dropped) == 30 - n_long
    assert dropped.stats["skipped_missing_key"] == 1 and dropped.stats["conversations"] == 30

    truncated = SFTDataset(path, tok, seq_length=seq, pack=False, overflow="truncate", seed=None)
    assert truncated.stats["truncated"] == n_long
    assert len(truncated) + truncated.stats["dropped_no_answer_after_truncation"] == 30
    for i in range(len(truncated)):
        sample = truncated[i]
        assert sample["loss_mask"].sum() > 0
        if (sample["segment_ids"] == 1).all():  # a truncated one: the last position has no known next token
            assert sample["loss_mask"][-1] == 0


def test_packing_keeps_every_conversation_once_with_restarting_positions(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "sft.jsonl", random_conversations(40, seed=2))
    unpacked = SFTDataset(path, tok, seq_length=256, pack=False, seed=7)
    packed = SFTDataset(path, tok, seq_length=256, pack=True, seed=7)
    assert len(packed) < len(unpacked)
    expected = sorted(tuple(s["tokens"][s["segment_ids"] == 1].tolist()) for s in map(unpacked.__getitem__,
                                                                                       range(len(unpacked))))
    found = []
    for i in range(len(packed)):
        sample = packed[i]
        segs = sample["segment_ids"]
        n_segments = int(segs.max())
        assert n_segments >= 1 and segs[0] == 1
        nonzero = segs[segs > 0]
        assert torch.equal(nonzero, torch.sort(nonzero).values)  # contiguous 1..n, padding at the end
        for seg in range(1, n_segments + 1):
            where = segs == seg
            assert torch.equal(sample["position_ids"][where], torch.arange(int(where.sum())))
            found.append(tuple(sample["tokens"][where].tolist()))
    assert sorted(found) == expected


def test_packed_attention_mask_is_block_diagonal_causal():
    mask = packed_attention_mask(torch.tensor([[1, 1, 2, 2, 2, 0]]))
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    allowed = (~mask[0, 0]).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]  # padding: only itself, so no softmax row is empty


class TinyCausalLM(torch.nn.Module):
    """Just enough of a transformer to depend on the mask and the position ids: learned positions, 2 attention
    layers taking a megatron-style bool mask (True = masked)."""

    def __init__(self, vocab_size, dim=32, heads=4, max_positions=512):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, dim)
        self.positions = torch.nn.Embedding(max_positions, dim)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(),
                                                           torch.nn.Linear(2 * dim, dim)) for _ in range(2))
        self.head = torch.nn.Linear(dim, vocab_size)
        self.heads = heads

    def forward(self, tokens, position_ids, attention_mask):
        x = self.embed(tokens) + self.positions(position_ids)
        b, s, d = x.shape
        for qkv, mlp in zip(self.qkv, self.mlp):
            q, k, v = qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
            attn = scores.masked_fill(attention_mask, float("-inf")).softmax(-1)
            x = x + (attn @ v).transpose(1, 2).reshape(b, s, d)
            x = x + mlp(x)
        return self.head(x)


def per_segment_losses(model, batch, attention_mask):
    logits = model(batch["tokens"], batch["position_ids"], attention_mask)
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    token_loss = token_loss * batch["loss_mask"]
    losses = {}
    for b in range(batch["tokens"].shape[0]):
        for seg in batch["segment_ids"][b].unique().tolist():
            if seg:
                key = tuple(batch["tokens"][b][batch["segment_ids"][b] == seg].tolist())
                losses[key] = token_loss[b][batch["segment_ids"][b] == seg].sum().item()
    return losses


def test_packed_and_unpacked_losses_match_per_conversation(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "sft.jsonl", random_conversations(12, seed=3))
    unpacked = SFTDataset(path, tok, seq_length=256, pack=False, seed=5)
    packed = SFTDataset(path, tok, seq_length=256, pack=True, seed=5)
    assert any(int(packed[i]["segment_ids"].max()) > 1 for i in range(len(packed)))
    torch.manual_seed(0)
    model = TinyCausalLM(tok.vocab_size).double()
    collate = torch.utils.data.default_collate
    unpacked_batch = collate([unpacked[i] for i in range(len(unpacked))])
    packed_batch = collate([packed[i] for i in range(len(packed))])
    with torch.no_grad():
        expected = per_segment_losses(model, unpacked_batch, packed_attention_mask(unpacked_batch["segment_ids"]))
        got = per_segment_losses(model, packed_batch, packed_attention_mask(packed_batch["segment_ids"]))
        assert expected.keys() == got.keys() and len(got) == 12
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-9)
        # Control: a plain causal mask over the packed rows lets conversations see each other -> losses change.
        plain = torch.ones(256, 256, dtype=torch.bool).tril().logical_not()[None, None]
        leaky = per_segment_losses(model, packed_batch, plain.expand(len(packed), 1, 256, 256))
        assert any(leaky[k] != pytest.approx(expected[k], rel=1e-6) for k in expected)


def test_indexed_source_gives_the_same_samples(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "sft.jsonl", random_conversations(20, seed=4) + [{"messages": "bad"}])
    result = preprocess(path, str(tmp_path / "sft"), str(tiny_tokenizer_dir()), mode="sft", progress=False)
    assert result.skipped["bad_messages"] == 1
    from_jsonl = SFTDataset(path, tok, seq_length=128, pack=True, seed=3)
    from_index = SFTDataset(result.prefixes[0], tok, seq_length=128, pack=True, seed=3)
    assert len(from_jsonl) == len(from_index)
    for i in range(len(from_index)):
        a, b = from_jsonl[i], from_index[i]
        assert all(torch.equal(a[k], b[k]) for k in KEYS)


def test_no_usable_conversation_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"question": "only a question"}, {"answer": "only an answer"}])
    with pytest.raises(ValueError, match="skipped_missing_key=2"):
        SFTDataset(path, tiny_tokenizer(), seq_length=64)


def test_build_sft_datasets_split_and_several_sources(tmp_path):
    from tinyllm_mcore.data.sft_samples import build_sft_datasets

    tok = tiny_tokenizer()
    a = write_jsonl(tmp_path / "a.jsonl", random_conversations(30, seed=5))
    b = preprocess(write_jsonl(tmp_path / "b.jsonl", random_conversations(10, seed=6)), str(tmp_path / "b"),
                   str(tiny_tokenizer_dir()), mode="sft", progress=False).prefixes[0]
    train, valid, test = build_sft_datasets([a, b], tok, 128, split="90,10,0", seed=1, pack=False)
    assert test is None and len(train) + len(valid) == 40 and len(valid) == 4  # 3 of a + 1 of b
    key = lambda s: tuple(s["tokens"][s["segment_ids"] == 1].tolist())
    assert not {key(train[i]) for i in range(len(train))} & {key(valid[i]) for i in range(len(valid))}


def test_packed_and_unpacked_losses_match_with_the_megatron_model(tmp_path):
    """The same check through the project's megatron-core GPTModel (RoPE positions, SDPA with the bool mask)."""
    from tinyllm_mcore.model.build import build_model, transformer_config
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.runtime import distributed as rt

    tok = tiny_tokenizer()
    path = write_jsonl(tmp_path / "sft.jsonl", random_conversations(8, seed=8))
    unpacked = SFTDataset(path, tok, seq_length=256, pack=False, seed=5)
    packed = SFTDataset(path, tok, seq_length=256, pack=True, seed=5)
    rt.initialize()
    try:
        torch.manual_seed(0)
        preset = get_preset("tiny", vocab_size=tok.vocab_size)
        config = transformer_config(preset, use_cpu_initialization=True)
        model = build_model(preset, config, make_vocab_size_divisible_by=1).eval()

        def forward(tokens, position_ids, attention_mask):  # megatron returns [b, s, vocab] logits without labels
            return model(tokens, position_ids, attention_mask)

        collate = torch.utils.data.default_collate
        unpacked_batch = collate([unpacked[i] for i in range(len(unpacked))])
        packed_batch = collate([packed[i] for i in range(len(packed))])
        with torch.no_grad():
            expected = per_segment_losses(forward, unpacked_batch, packed_attention_mask(unpacked_batch["segment_ids"]))
            got = per_segment_losses(forward, packed_batch, packed_attention_mask(packed_batch["segment_ids"]))
        assert len(packed) < len(unpacked) and expected.keys() == got.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-4)
    finally:
        rt.destroy()


def _write_indexed(prefix, documents):
    """An indexed prefix of the given documents (lists of token segments), as any tool may have written it."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for segments in documents:
        for segment in segments:
            builder.add_item(torch.tensor(segment, dtype=torch.int64))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_empty_answers_are_skipped_and_counted(tmp_path):
    """Issue 12 item 18: an empty answer was trained as "eos immediately"."""
    tok = tiny_tokenizer()
    records = random_conversations(6, seed=7) + [
        {"question": "空回答", "answer": ""}, {"question": "空白回答", "answer": "  \n"},
        {"messages": [{"role": "user", "content": "一"}, {"role": "assistant", "content": "好"},
                      {"role": "user", "content": "二"}, {"role": "assistant", "content": ""}]}]
    dataset = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", records), tok, seq_length=512, pack=False, seed=None)
    assert len(dataset) == 6 and sum(v for k, v in dataset.stats.items() if k.startswith("skipped")) == 3
    for i in range(len(dataset)):  # no trained answer is the eos alone
        sample = dataset[i]
        trained = sample["labels"][sample["loss_mask"] == 1].tolist()
        assert trained.count(tok.eos) >= 1 and trained[0] != tok.eos
    # The same in an indexed prefix written before preprocessing rejected empty answers.
    prompt = tok.chat_prompt_ids([{"role": "user", "content": "问"}])
    prefix = _write_indexed(tmp_path / "old_sft_document", [[prompt, tok.tokenize("答") + [tok.eos]],
                                                            [prompt, [tok.eos]]])
    dataset = SFTDataset(prefix, tok, seq_length=64, pack=False)
    assert len(dataset) == 1 and dataset.stats["skipped_empty_answer"] == 1


def test_empty_or_wrong_mode_prefix_is_one_clear_error(tmp_path):
    """Issue 12 items 13 and 18: a preference prefix read as SFT trained on a misread layout; an empty prefix failed
    with `cannot mmap an empty file`."""
    import shutil

    from tinyllm_mcore.data.preference import PreferenceDataset

    tok = tiny_tokenizer()
    empty = _write_indexed(tmp_path / "empty_sft_document", [])
    with pytest.raises(ValueError, match=f"data prefix {empty}: empty dataset"):
        SFTDataset(empty, tok, seq_length=64)
    pairs = [{"prompt": f"问{i}", "chosen": f"好{i}", "rejected": f"坏{i}"} for i in range(4)]
    preference = preprocess(write_jsonl(tmp_path / "p.jsonl", pairs), str(tmp_path / "p"), str(tiny_tokenizer_dir()),
                            mode="preference", progress=False).prefixes[0]
    sft = preprocess(write_jsonl(tmp_path / "s.jsonl", random_conversations(4)), str(tmp_path / "s"),
                     str(tiny_tokenizer_dir()), mode="sft", progress=False).prefixes[0]
    for prefix in (preference, sft):  # without a sidecar (Megatron-LM's tools write none) the layout decides
        for suffix in (".bin", ".idx"):
            shutil.copy(prefix + suffix, str(tmp_path / "bare") + "_" + prefix.rsplit("/", 1)[1] + suffix)
    bare_preference, bare_sft = (str(tmp_path / "bare") + "_" + p.rsplit("/", 1)[1] for p in (preference, sft))
    for prefix in (preference, bare_preference):
        with pytest.raises(ValueError, match=f"{prefix} (is not a --mode sft dataset|is a --mode preference dataset, not --mode sft)") as info:
            SFTDataset(prefix, tok, seq_length=64)
        assert "\n" not in str(info.value)
    for prefix in (sft, bare_sft):
        with pytest.raises(ValueError, match=f"{prefix} (is not a --mode preference dataset|is a --mode sft dataset, not --mode preference)"):
            PreferenceDataset(prefix, tok, seq_length=64)
    with pytest.raises(ValueError, match="a --mode preference prefix\\? Give it as --preference-data"):
        SFTDataset(bare_preference, tok, seq_length=64)
    with pytest.raises(ValueError, match="a --mode sft prefix\\? Give it as --sft-data"):
        PreferenceDataset(bare_sft, tok, seq_length=64)
    with pytest.raises(ValueError, match="is a --mode preference dataset, not --mode sft: give it as --preference-data"):
        SFTDataset(preference, tok, seq_length=64)
    with pytest.raises(ValueError, match="is a --mode sft dataset, not --mode preference: give it as --sft-data"):
        PreferenceDataset(sft, tok, seq_length=64)
