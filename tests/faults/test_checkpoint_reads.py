"""Every command that reads a checkpoint checks it the same way (issue 27, items 1-3): the tokenizer it was trained
with (generate, evaluate, the HF export, reward --init-from, like training's --load), its manifest (a checkpoint
without one is a warning, or an error with --require-manifest), and reward --init-from goes through the same checked
load as --load. Real CLI processes on a small checkpoint trained with tokenizer A; tokenizer B has A's size and other
pieces.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.cli import one_error_line
from tests.harness.text_data import tiny_tokenizer_dir, write_text_jsonl

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--lr-warmup-iters", "0"]


def run(module, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def succeeded(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained with a copy of tokenizer A (so the test can later swap that copy's files), tokenizer B
    of the same size, and held-out text for evaluation."""
    from tinyllm_mcore.tokenizer.core import Tokenizer
    from tinyllm_mcore.tokenizer.training import train_tokenizer

    tmp = tmp_path_factory.mktemp("reads")
    tok_a = tmp / "tok_a"
    shutil.copytree(tiny_tokenizer_dir(), tok_a)
    write_text_jsonl(tmp / "other.jsonl", 3000, seed=7)
    tok_b = tmp / "tok_b"
    train_tokenizer(str(tmp / "other.jsonl"), tok_b, vocab_size=1000, character_coverage=1.0, num_threads=1)
    a, b = Tokenizer.load(tok_a), Tokenizer.load(tok_b)
    assert a.vocab_size == b.vocab_size and a.identity != b.identity
    write_text_jsonl(tmp / "held_out.jsonl", 20, seed=11)
    (tmp / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"question {i}", "chosen": "a good answer", "rejected": "bad"}, ensure_ascii=False) + "\n"
        for i in range(8)), encoding="utf-8")
    root = tmp / "ckpt"
    succeeded(run("tinyllm_mcore.stages.pretrain", *TINY, "--mock-data", "--tokenizer-model", tok_a,
                  "--train-iters", "1", "--save", root))
    return {"tmp": tmp, "root": root, "a": tok_a, "b": tok_b}


def readers(t, tokenizer, out):
    """Each command that reads the checkpoint, given `tokenizer`."""
    root = t["root"]
    return {
        "generate": ("tinyllm_mcore.cli.generate", "--load", root, "--tokenizer-model", tokenizer, "--prompt", "x",
                     "--max-new-tokens", "2"),
        "evaluate": ("tinyllm_mcore.cli.evaluate", "--load", root, "--tokenizer-model", tokenizer, "--jsonl",
                     t["tmp"] / "held_out.jsonl", "--seq-length", "32"),
        "mcore-to-hf": ("tinyllm_mcore.cli.mcore_to_hf", "--load", root, "--save", out, "--tokenizer-model",
                        tokenizer, "--quiet"),
        "reward --init-from": ("tinyllm_mcore.stages.reward", *TINY, "--tokenizer-model", tokenizer,
                               "--init-from", root, "--preference-data", t["tmp"] / "pairs.jsonl",
                               "--train-iters", "1", "--seq-length", "128", "--save", out),
    }


@pytest.mark.parametrize("command", ["generate", "evaluate", "mcore-to-hf", "reward --init-from"])
def test_another_tokenizer_of_the_same_size_is_refused_unless_allowed(trained, tmp_path, command):
    refused = run(*readers(trained, trained["b"], tmp_path / "out")[command])
    one_error_line(refused, "trained with another tokenizer", "--allow-tokenizer-change", str(trained["a"]))
    out = tmp_path / "out"  # nothing written, the export above all (training only claimed its --save folder)
    assert not out.exists() or (command == "reward --init-from" and [p.name for p in out.iterdir()] == [".run.lock"])
    succeeded(run(*readers(trained, trained["b"], tmp_path / "out")[command], "--allow-tokenizer-change"))
    assert command in ("generate", "evaluate") or (tmp_path / "out").exists()


def test_export_refuses_a_recorded_tokenizer_whose_files_changed(trained, tmp_path):
    """The silent wrong release: no --tokenizer-model, and the path the checkpoint recorded now holds another one."""
    tok, root = tmp_path / "tok", tmp_path / "ckpt"
    shutil.copytree(trained["a"], tok)
    succeeded(run("tinyllm_mcore.stages.pretrain", *TINY, "--mock-data", "--tokenizer-model", tok,
                  "--train-iters", "1", "--save", root))
    succeeded(run("tinyllm_mcore.cli.mcore_to_hf", "--load", root, "--save", tmp_path / "same", "--quiet"))
    shutil.rmtree(tok)
    shutil.copytree(trained["b"], tok)
    one_error_line(run("tinyllm_mcore.cli.mcore_to_hf", "--load", root, "--save", tmp_path / "hf", "--quiet"),
                   "trained with another tokenizer", str(tok))
    assert not (tmp_path / "hf").exists()


def test_reward_init_from_is_verified_like_load(trained, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(trained["root"], root)
    shard = sorted((root / "iter_0000001").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    t = dict(trained, root=root)
    one_error_line(run(*readers(t, trained["a"], tmp_path / "rm")["reward --init-from"]), "checksum mismatch",
                   shard.name)
    # argparse keeps the last --model-size: a reward model of another size than its trunk
    one_error_line(run(*readers(t, trained["a"], tmp_path / "rm")["reward --init-from"], "--model-size", "16m",
                       "--no-verify-checkpoint"), "is a tiny model and this run builds 16m")


def test_checkpoint_without_manifest_warns_or_is_refused(trained, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(trained["root"], root)
    (root / "iter_0000001" / "manifest.json").unlink()
    generate = readers(dict(trained, root=root), trained["a"], tmp_path / "out")["generate"]
    loaded = succeeded(run(*generate))
    warnings = [line for line in loaded.stderr.splitlines() if "manifest" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "--require-manifest" in warnings[0], \
        loaded.stderr[-2000:]
    one_error_line(run(*generate, "--require-manifest"), "no manifest.json", "--require-manifest")
    one_error_line(run("tinyllm_mcore.stages.pretrain", *TINY, "--mock-data", "--tokenizer-model", trained["a"],
                       "--train-iters", "2", "--load", root, "--require-manifest"), "no manifest.json")
