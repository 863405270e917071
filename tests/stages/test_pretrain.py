"""`python -m tinyllm_mcore.stages.pretrain`: bad input gives one clear line and exit code 2, before any heavy work."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, env_extra=None, timeout=120):
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "tinyllm_mcore.stages.pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr.strip().splitlines()


BASE = ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "2"]


@pytest.mark.parametrize("args,env,message", [
    (["--data-path", "/nonexistent/corpus_text_document"], None,
     "--data-path /nonexistent/corpus_text_document: /nonexistent/corpus_text_document.bin and .idx not found"),
    (["--data-path", "0.3", "/nope/a", "0.7", "/nope/b"], None, "--data-path /nope/a: /nope/a.bin and .idx not found"),
    (["--data-path", "0.3", "/nope/a", "/nope/b"], None, "'weight prefix' pairs"),
    (["--mock-data", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
     {"RANK": "0", "WORLD_SIZE": "6", "LOCAL_RANK": "0"}, "world size 6 is not divisible by tensor-parallel 2 x pipeline-parallel 2"),
    (["--mock-data", "--model-size", "16m", "--tensor-model-parallel-size", "4"],
     {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "6 attention heads are not divisible by tensor-parallel size 4"),
    (["--mock-data", "--load", "/tmp"], None, "not a checkpoint directory"),
    (["--mock-data", "--load", "/does/not/exist"], None, "checkpoint path does not exist"),
    ([], None, "give --data-path"),
])
def test_bad_input_is_one_line(args, env, message):
    code, err = run_cli(BASE + args, env)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.distributed
def test_pretrain_end_to_end_tp2_on_preprocessed_data(tmp_path):
    """tokenizer → preprocess_data → torchrun pretrain at TP2 with eval, TensorBoard, metrics and a checkpoint."""
    import json
    import socket

    from tests.harness.text_data import tiny_tokenizer_dir, write_text_jsonl
    from tinyllm_mcore.cli import preprocess_data

    write_text_jsonl(tmp_path / "corpus.jsonl", 400, seed=3)
    tok = tiny_tokenizer_dir() / "tokenizer.model"
    assert preprocess_data.main(["--input", str(tmp_path / "corpus.jsonl"), "--tokenizer-model", str(tok),
                                 "--output-prefix", str(tmp_path / "corpus"), "--append-eod", "--no-progress"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}",
           "-m", "tinyllm_mcore.stages.pretrain", "--model-size", "tiny", "--tensor-model-parallel-size", "2",
           "--data-path", str(tmp_path / "corpus_text_document"), "--split", "90,10,0",
           "--tokenizer-model", str(tok), "--seq-length", "64", "--micro-batch-size", "4", "--train-iters", "30",
           "--lr", "3e-3", "--min-lr", "3e-4", "--log-interval", "5", "--eval-interval", "15", "--eval-iters", "2",
           "--save", str(tmp_path / "ckpt"), "--tensorboard-dir", str(tmp_path / "tb"),
           "--metrics-jsonl", str(tmp_path / "metrics.jsonl")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r["lm loss"] for r in records if r["split"] == "train"]
    valid = [r["lm loss"] for r in records if r["split"] == "valid"]
    assert len(train) == 6 and len(valid) == 2
    assert train[-1] < train[0] - 0.5, train  # from ~ln(1000) towards the unigram entropy
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in records if r["split"] == "train")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "30"
