"""Fault injection on the training CLI and its checkpoints (issue 12): corrupt or mismatched checkpoints, a second run
on the same --save, kill -9 during a save, half-written saves, data outside the vocabulary, bad --split, runs that
trained nothing. Each ends with one `error:` line and a non-zero exit (no traceback), or is handled and reported.

One small checkpoint (tiny preset, 2 iterations) is made once and copied per case.
"""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.harness.cli import one_error_line
from tests.harness.text_data import tiny_tokenizer_dir

REPO = Path(__file__).resolve().parents[2]
BASE = ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--lr-warmup-iters", "0",
        "--log-interval", "1"]


def pretrain(args, timeout=300, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tinyllm_mcore.stages.pretrain", *BASE, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "ckpt"
    proc = pretrain(["--mock-data", "--train-iters", "2", "--save", str(root)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def copy_of(saved, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(saved, target)
    return target, target / "iter_0000002"


def test_checkpoint_has_a_manifest_of_every_file(saved):
    import json

    manifest = json.loads((saved / "iter_0000002" / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(saved / "iter_0000002")) for p in (saved / "iter_0000002").rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert set(manifest) == on_disk and any(name.endswith(".distcp") for name in manifest)


def _flip_bytes(path: Path, offset_fraction=0.5, count=64):
    data = bytearray(path.read_bytes())
    start = int(len(data) * offset_fraction)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,fragment", [
    ("bitflip", "checksum mismatch"),
    ("truncate_shard", "bytes, manifest says"),
    ("zero_shard", "bytes, manifest says"),
    ("missing_shard", "missing"),
    ("truncate_metadata", ".metadata"),
    ("garbage_common", "common.pt"),
])
def test_damaged_checkpoint_is_refused_naming_the_file(saved, tmp_path, damage, fragment):
    root, it = copy_of(saved, tmp_path)
    shard = sorted(it.glob("*.distcp"))[0]
    if damage == "bitflip":  # the case that used to load silently and train on NaNs
        _flip_bytes(shard)
    elif damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "zero_shard":
        shard.write_bytes(b"")
    elif damage == "missing_shard":
        shard.unlink()
    elif damage == "truncate_metadata":
        meta = it / ".metadata"
        meta.write_bytes(meta.read_bytes()[:40])
    elif damage == "garbage_common":
        (it / "common.pt").write_bytes(b"not a pickle" * 10)
    proc = pretrain(["--mock-data", "--train-iters", "4", "--load", str(root)])
    one_error_line(proc, fragment, "corrupt")


def test_unverified_damaged_checkpoint_is_still_one_line(saved, tmp_path):
    root, it = copy_of(saved, tmp_path)
    (it / "common.pt").write_bytes(b"garbage")
    proc = pretrain(["--mock-data", "--train-iters", "4", "--load", str(root), "--no-verify-checkpoint"])
    one_error_line(proc, str(it))


def test_checkpoint_of_another_size_is_one_line(saved):
    proc = pretrain(["--mock-data", "--model-size", "16m", "--train-iters", "4", "--load", str(saved)])
    one_error_line(proc, "is a tiny model and this run builds 16m", "--model-size tiny")


@pytest.mark.parametrize("argv,fragment", [
    (["--mock-data", "--finetune"], "--finetune needs --load"),
    (["--mock-data", "--split=-50,50,0"], "--split '-50,50,0'"),
    (["--mock-data", "--split", "abc"], "--split 'abc'"),
    (["--mock-data", "--split", "0,0,0"], "not all zero"),
    (["--mock-data", "--split", "95,5,0,1"], "up to three"),
])
def test_bad_flags_are_one_line(argv, fragment):
    one_error_line(pretrain(argv + ["--train-iters", "2"]), fragment)


def test_second_run_on_the_same_save_is_refused(tmp_path):
    save = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, "-m", "tinyllm_mcore.stages.pretrain", *BASE, "--mock-data", "--train-iters",
                              "100000", "--save", str(save), "--exit-signal-handler", "--log-interval", "1000"],
                             cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        lock = save / ".run.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().startswith("pid")) and time.time() < deadline:
            time.sleep(0.5)
        second = pretrain(["--mock-data", "--train-iters", "2", "--save", str(save)])
        one_error_line(second, f"--save {save} is in use by another run", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGTERM)  # the first run saves and exits cleanly
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").is_file()


WRITER_SLEEPS = textwrap.dedent("""
    import os, sys, time
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async.FileSystemWriterAsync.write_preloaded_data

    def slow_write(*args, **kwargs):  # runs in megatron's forked writer process
        open(os.path.join(sys.argv[1], f"writer-{os.getpid()}"), "w").close()
        time.sleep(300)
        return original(*args, **kwargs)

    filesystem_async.FileSystemWriterAsync.write_preloaded_data = staticmethod(slow_write)
    from tinyllm_mcore.stages.pretrain import main
    raise SystemExit(main(sys.argv[2:]))
""")


def test_kill_9_during_a_save_leaves_no_process_behind(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "slow_save.py"
    script.write_text(WRITER_SLEEPS)
    markers = tmp_path / "markers"
    markers.mkdir()
    trainer = subprocess.Popen([sys.executable, str(script), str(markers), *BASE, "--mock-data", "--train-iters", "2",
                                "--save", str(tmp_path / "ckpt")], cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not list(markers.iterdir()) and time.time() < deadline and trainer.poll() is None:
            time.sleep(0.2)
        assert list(markers.iterdir()), "the save never reached megatron's bucket writer"
        descendants = psutil.Process(trainer.pid).children(recursive=True)  # none: the writers are threads
        trainer.kill()  # kill -9 mid-save
        trainer.wait()
        gone, alive = psutil.wait_procs(descendants, timeout=20)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
    finally:
        if trainer.poll() is None:
            trainer.kill()
    # the next run reports the half-written save and removes it, then resumes from nothing and saves
    partial = tmp_path / "ckpt" / "iter_0000002"
    assert partial.is_dir() and not (partial / "manifest.json").exists()
    proc = pretrain(["--mock-data", "--train-iters", "1", "--save", str(tmp_path / "ckpt")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {partial}" in proc.stdout
    assert not partial.exists() and (tmp_path / "ckpt" / "iter_0000001" / "manifest.json").is_file()


def _write_indexed(prefix: Path, documents: list[list[int]]):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for doc in documents:
        import torch

        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


def test_token_ids_outside_the_vocabulary_are_caught(tmp_path):
    import json

    tok = tiny_tokenizer_dir()  # about a thousand ids: most of the ids written below are outside it
    rng = np.random.default_rng(0)
    prefix = tmp_path / "foreign_text_document"
    _write_indexed(prefix, [list(rng.integers(0, 5000, size=80)) for _ in range(40)])
    args = ["--data-path", str(prefix), "--tokenizer-model", str(tok), "--train-iters", "2", "--split", "100,0,0"]
    # no sidecar (e.g. made by Megatron-LM's own tool): the per-sample guard names the prefix and the sample
    one_error_line(pretrain(args), str(prefix), "outside the model's vocabulary")
    # a sidecar that says so: refused before training
    prefix.with_suffix(".json").write_text(json.dumps({
        "format": "tinyllm-mcore-indexed-dataset", "version": 1, "mode": "pretrain", "max_token_id": 4999,
        "tokenizer": {"vocab_size": 5000}, "bin_bytes": os.path.getsize(str(prefix) + ".bin"),
        "idx_bytes": os.path.getsize(str(prefix) + ".idx")}))
    one_error_line(pretrain(args), str(prefix), "do not fit vocab size")


def test_validation_without_a_validation_split_is_one_line(tmp_path):
    prefix = tmp_path / "text_document"
    _write_indexed(prefix, [list(np.random.default_rng(1).integers(0, 500, size=80)) for _ in range(40)])
    proc = pretrain(["--data-path", str(prefix), "--tokenizer-model", str(tiny_tokenizer_dir()), "--train-iters",
                     "2", "--split", "100,0,0", "--eval-interval", "1"])
    one_error_line(proc, "--split 100,0,0 leaves no validation data")


def test_checkpoint_and_tokenizer_must_match(tmp_path):
    from tests.harness.text_data import write_text_jsonl
    from tinyllm_mcore.tokenizer.training import train_tokenizer

    other = tmp_path / "other_tok"
    write_text_jsonl(tmp_path / "other.jsonl", 3000, seed=7)
    train_tokenizer(str(tmp_path / "other.jsonl"), other, vocab_size=1000, character_coverage=1.0, num_threads=1)
    small = tmp_path / "small_tok"
    train_tokenizer(str(tmp_path / "other.jsonl"), small, vocab_size=600, character_coverage=1.0, num_threads=1)
    root = tmp_path / "ckpt"
    made = pretrain(["--mock-data", "--tokenizer-model", str(tiny_tokenizer_dir()), "--train-iters", "1",
                     "--save", str(root)])
    assert made.returncode == 0, made.stderr[-3000:]
    # same vocabulary size, other pieces: refused unless deliberate
    one_error_line(pretrain(["--mock-data", "--tokenizer-model", str(other), "--train-iters", "2", "--load",
                             str(root)]), "trained with another tokenizer", "--allow-tokenizer-change")
    allowed = pretrain(["--mock-data", "--tokenizer-model", str(other), "--train-iters", "2", "--load", str(root),
                        "--allow-tokenizer-change"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    # another vocabulary size: refused
    one_error_line(pretrain(["--mock-data", "--tokenizer-model", str(small), "--train-iters", "2", "--load",
                             str(root)]), "-token vocabulary and this run's tokenizer")


def test_a_run_that_skipped_every_iteration_fails():
    import math

    from tests.harness.progression_data import progression_datasets
    from tinyllm_mcore.training.batches import lm_forward_step
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.loop import Stage, parse_args, train

    def poisoned(ctx, data_iterator, model):
        output, loss_fn = lm_forward_step(ctx, data_iterator, model)

        def nan_loss(output_tensor):
            total, count, report = loss_fn(output_tensor)
            return total * math.nan, count, {k: v * math.nan for k, v in report.items()}

        return output, nan_loss

    stage = Stage("pretrain", progression_datasets, poisoned)
    args = parse_args(stage, BASE + ["--mock-data", "--train-iters", "3", "--max-skipped-iters", "10"])
    try:
        with pytest.raises(FloatingPointError, match="every one of the 3 iterations"):
            train(stage, args)
    finally:
        rt.destroy()


def test_a_failed_run_releases_what_it_held(tmp_path):
    """An error after the --save folder was claimed (here: in the datasets provider) still releases the folder's
    lock and restores the signal handler, so the same process can run again with the same --save."""
    from tests.harness.progression_data import progression_datasets
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.training.loop import Stage, parse_args, train
    from tinyllm_mcore.training.batches import lm_forward_step

    def broken_datasets(ctx):
        raise ValueError("no data today")

    argv = BASE + ["--mock-data", "--train-iters", "1", "--save", str(tmp_path / "ckpt"), "--exit-signal-handler"]
    handler = signal.getsignal(signal.SIGTERM)
    broken = Stage("pretrain", broken_datasets, lm_forward_step)
    try:
        with pytest.raises(ValueError, match="no data today"):
            train(broken, parse_args(broken, argv))
        assert signal.getsignal(signal.SIGTERM) == handler
        rt.destroy()
        working = Stage("pretrain", progression_datasets, lm_forward_step)
        assert train(working, parse_args(working, argv))["iteration"] == 1
    finally:
        rt.destroy()
