"""A Hugging Face tokenizer through the whole pipeline, as a user runs it: preprocess with Megatron-LM's
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``, pretrain, evaluate the checkpoint, export to HF
(the tokenizer's files shipped unchanged) and evaluate the export — the same perplexity both ways."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.tiny_hf_tokenizer import tiny_hf_tokenizer_dir
from tests.tiny_data import write_text_jsonl
from tools import preprocess_data

REPO = Path(__file__).resolve().parents[2]


def run(args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_pretrain_evaluate_export_with_an_hf_tokenizer(tmp_path):
    hf_dir = tiny_hf_tokenizer_dir()
    write_text_jsonl(tmp_path / "corpus.jsonl", 300, seed=3)
    write_text_jsonl(tmp_path / "heldout.jsonl", 20, seed=4)
    tokenizer = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf_dir)]
    assert preprocess_data.main(["--input", str(tmp_path / "corpus.jsonl"), "--output-prefix", str(tmp_path / "c"),
                                 "--append-eod", "--no-progress", *tokenizer]) == 0
    run(["-m", "tinyllm_mcore.pretrain", "--model-size", "tiny", "--data-path", str(tmp_path / "c_text_document"),
         "--split", "100,0,0", *tokenizer, "--seq-length", "32", "--micro-batch-size", "4", "--train-iters", "20",
         "--lr", "3e-3", "--min-lr", "3e-4", "--log-interval", "10", "--save", str(tmp_path / "ckpt")])
    run(["tools/evaluate.py", "--load", str(tmp_path / "ckpt"), *tokenizer, "--jsonl", str(tmp_path / "heldout.jsonl"),
         "--seq-length", "32", "--output-json", str(tmp_path / "mcore.json")])
    run(["checkpoint_convert/mcore_to_hf.py", "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "hf")])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (hf_dir / name).read_bytes(), name
    run(["tools/evaluate.py", "--hf", str(tmp_path / "hf"), "--jsonl", str(tmp_path / "heldout.jsonl"),
         "--seq-length", "32", "--output-json", str(tmp_path / "hf.json")])
    mcore, hf = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("mcore", "hf"))
    vocab = json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"]
    assert vocab == 600
    assert mcore["tokens"] == hf["tokens"] > 0
    assert abs(mcore["loss"] - hf["loss"]) < 1e-3 and mcore["loss"] < 6.0, (mcore, hf)  # ln(600) = 6.4: it learned
