"""The vocabulary sidecar beside each preprocessed pair, and the check training calls before using a prefix."""
import json
import os

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tests.harness.hf_tokenizer import tiny_hf_tokenizer_dir
from tests.harness.text_data import tiny_tokenizer, tiny_tokenizer_dir, write_text_jsonl
from tinyllm_mcore.data.vocab_contract import check_prefix_vocab, read_sidecar, sidecar_path
from tinyllm_mcore.tokenizer.core import Tokenizer
from tinyllm_mcore.cli import preprocess_data


@pytest.fixture()
def prefix(tmp_path):
    write_text_jsonl(tmp_path / "c.jsonl", 30, seed=2)
    assert preprocess_data.main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "c"),
                                 "--tokenizer-model", str(tiny_tokenizer_dir()), "--append-eod",
                                 "--no-progress"]) == 0
    return str(tmp_path / "c_text_document")


def test_sidecar_records_the_tokenizer_and_what_was_written(prefix):
    tok = tiny_tokenizer()
    sidecar = read_sidecar(prefix)
    dataset = IndexedDataset(prefix)  # megatron-core still reads the pair
    assert sidecar["tokenizer"]["identity"] == tok.identity and sidecar["tokenizer"]["vocab_size"] == tok.vocab_size
    assert sidecar["max_token_id"] == max(int(dataset[i].max()) for i in range(len(dataset)))
    assert sidecar["tokens"] == int(dataset.sequence_lengths.sum()) and sidecar["documents"] == 30
    assert sidecar["bin_bytes"] == os.path.getsize(prefix + ".bin") and sidecar["mode"] == "pretrain"
    assert check_prefix_vocab(prefix, tok.vocab_size, tok.identity, mode="pretrain") == sidecar


def test_check_refuses_data_that_does_not_fit_in_one_line(prefix):
    tok = tiny_tokenizer()
    hf = Tokenizer.load(tiny_hf_tokenizer_dir())
    max_id = read_sidecar(prefix)["max_token_id"]
    cases = [(dict(vocab_size=max_id), "do not fit vocab size"),
             (dict(vocab_size=tok.vocab_size, tokenizer_hash=hf.identity), "made with another tokenizer"),
             (dict(vocab_size=tok.vocab_size, mode="sft"), "a pretrain dataset, expected sft")]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            check_prefix_vocab(prefix, **kwargs)
        assert str(e.value).startswith(prefix) and message in str(e.value) and "\n" not in str(e.value)
    check_prefix_vocab(prefix, max_id + 1)  # ids up to max_id fit

    with open(prefix + ".bin", "ab") as f:  # a .bin that is not the one preprocessing wrote
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="interrupted copy"):
        check_prefix_vocab(prefix, tok.vocab_size)
    sidecar_path(prefix).write_text("{not json")
    with pytest.raises(ValueError, match="unreadable vocabulary sidecar"):
        check_prefix_vocab(prefix, tok.vocab_size)
    sidecar_path(prefix).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a tinyllm-mcore dataset sidecar"):
        read_sidecar(prefix)
    sidecar_path(prefix).unlink()
    assert check_prefix_vocab(prefix, 5) is None  # Megatron-LM's data: no sidecar, nothing to check here
