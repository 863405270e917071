"""Perplexity: windows over the concatenated documents, checked against a straightforward HF loss; indexed data and
jsonl give the same numbers for the same documents."""
import json
import math

import numpy as np
import pytest
import torch

from tests.harness.cmmlu import make_tiny_hf_model
from tests.harness.text_data import random_text, tiny_tokenizer
from tinyllm_mcore.evaluation import perplexity
from tinyllm_mcore.evaluation.backends import HFCausalLM


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return HFCausalLM.from_pretrained(str(make_tiny_hf_model(tmp_path_factory.mktemp("ppl") / "hf", init_std=0.05)))


@pytest.fixture(scope="module")
def texts():
    import random

    rng = random.Random(2)
    return [random_text(rng, 20, 200) for _ in range(12)]


def test_windows_cover_every_token_once():
    docs = [list(range(10)), list(range(10, 25))]
    ws = list(perplexity.windows(docs, seq_length=8))
    assert ws == [list(range(0, 9)), list(range(8, 17)), list(range(16, 25))]
    assert sum(len(w) - 1 for w in ws) == 24  # every token but the first is predicted once
    assert list(perplexity.windows(docs, seq_length=8, max_tokens=8)) == [list(range(0, 9))]


def test_jsonl_perplexity_matches_a_plain_hf_loss(tmp_path, lm, texts):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "held_out.jsonl"
    path.write_text("\n".join([json.dumps({"text": t}, ensure_ascii=False) for t in texts] + ["{broken", '{"x": 1}']),
                    encoding="utf-8")
    skipped = {}
    docs = perplexity.jsonl_documents([str(path)], tokenizer.tokenize, tokenizer.eod, skipped=skipped)
    result = perplexity.evaluate_perplexity(lm, docs, seq_length=64, batch_size=3)
    assert skipped == {"bad line": 2}

    stream = [t for text in texts for t in tokenizer.tokenize(text) + [tokenizer.eod]]
    nll, count = 0.0, 0
    for start in range(0, len(stream) - 1, 64):  # reference: one window at a time, HF's own loss
        window = torch.tensor([stream[start: start + 65]])
        if window.size(1) < 2:
            break
        with torch.no_grad():
            out = lm.model(input_ids=window, labels=window)
        nll += float(out.loss) * (window.size(1) - 1)
        count += window.size(1) - 1
    assert result["tokens"] == count == len(stream) - 1
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_indexed_data_equals_jsonl(tmp_path, lm, texts):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokenizer = tiny_tokenizer()
    prefix = str(tmp_path / "valid_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for text in texts:
        builder.add_document(torch.tensor(tokenizer.tokenize(text) + [tokenizer.eod]), [len(tokenizer.tokenize(text)) + 1])
    builder.finalize(prefix + ".idx")
    indexed = perplexity.evaluate_perplexity(lm, perplexity.indexed_documents([prefix]), seq_length=50)
    plain = perplexity.evaluate_perplexity(
        lm, ([*tokenizer.tokenize(t), tokenizer.eod] for t in texts), seq_length=50)
    assert indexed["tokens"] == plain["tokens"]
    assert indexed["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"^--data-path {missing}: {missing}.bin and .idx not found"):
        list(perplexity.indexed_documents([prefix, missing]))  # named before the first prefix is read
