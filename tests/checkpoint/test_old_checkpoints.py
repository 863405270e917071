"""A checkpoint written before the metadata schema (tests/fixtures/checkpoint_v0, made by commit cfca0f0) still
resumes, generates, evaluates and exports to the values that code gave; what is written now carries the versioned
schema, and a version newer than this code reads is refused with one line.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness.cli import one_error_line
from tinyllm_mcore.checkpoint import io as ckpt
from tinyllm_mcore.checkpoint import safety
from tinyllm_mcore.checkpoint.metadata import KEY, SCHEMA_VERSION, CheckpointMetadata

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "checkpoint_v0"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
CKPT, TOKENIZER, HELD_OUT = FIXTURE / "ckpt", FIXTURE / "tokenizer", FIXTURE / "held_out.jsonl"
TOLERANCE = dict(rel=1e-6, abs=1e-6)


def run(module, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def succeeded(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def train_losses(metrics: Path) -> dict:
    return {str(r["iteration"]): r["lm loss"] for r in map(json.loads, metrics.read_text().splitlines())
            if r["split"] == "train"}


def perplexity(*model_args, tmp: Path) -> dict:
    out = tmp / f"eval{len(list(tmp.glob('eval*.json')))}.json"
    succeeded(run("tinyllm_mcore.cli.evaluate", *model_args, "--tokenizer-model", TOKENIZER, "--jsonl", HELD_OUT,
                  "--seq-length", "16", "--output-json", out))
    return json.loads(out.read_text())


def test_the_fixture_is_version_0():
    common = ckpt.read_common(ckpt.resolve_load_dir(CKPT))
    assert "args" in common and KEY not in common  # what the code before the schema wrote


def test_resumes_to_the_recorded_losses_and_saves_the_schema(tmp_path):
    succeeded(run("tinyllm_mcore.stages.pretrain", *EXPECTED["model_flags"], "--load", CKPT, "--save",
                  tmp_path / "resumed", "--metrics-jsonl", tmp_path / "metrics.jsonl"))
    losses = train_losses(tmp_path / "metrics.jsonl")
    assert losses.keys() == EXPECTED["resumed_losses"].keys()
    for iteration, loss in EXPECTED["resumed_losses"].items():
        assert losses[iteration] == pytest.approx(loss, **TOLERANCE), iteration

    old = ckpt.read_checkpoint(ckpt.resolve_load_dir(CKPT)).metadata
    saved = ckpt.read_checkpoint(ckpt.resolve_load_dir(tmp_path / "resumed"))
    assert "args" not in saved.common and saved.common[KEY]["schema_version"] == SCHEMA_VERSION
    new = saved.metadata
    assert new.stage == "pretrain" and old.stage is None
    assert new.flags["load"] == str(CKPT) and new.flags["train_iters"] == 4
    # everything code reads back is what the old checkpoint recorded under its flag names
    same = ("preset", "model_head", "tokenizer_model", "tokenizer_type", "tokenizer_identity",
            "make_vocab_size_divisible_by", "tensor_model_parallel_size", "pipeline_model_parallel_size",
            "use_distributed_optimizer", "seq_length", "micro_batch_size", "global_batch_size", "num_microbatches",
            "data_parallel_size")
    assert {k: getattr(new, k) for k in same} == {k: getattr(old, k) for k in same}


def test_generates_the_recorded_ids():
    recorded = EXPECTED["generate"]
    out = succeeded(run("tinyllm_mcore.cli.generate", "--load", CKPT, "--tokenizer-model", TOKENIZER, "--prompt",
                        recorded["prompt"], "--greedy", "--max-new-tokens", recorded["max_new_tokens"], "--json"))
    assert json.loads(out.stdout.strip().splitlines()[-1])["ids"] == recorded["output"]["ids"]


def test_evaluates_and_exports_to_the_recorded_perplexity(tmp_path):
    loaded = perplexity("--load", CKPT, tmp=tmp_path)
    assert loaded["tokens"] == EXPECTED["evaluate"]["tokens"]
    assert loaded["loss"] == pytest.approx(EXPECTED["evaluate"]["loss"], **TOLERANCE)
    # no --tokenizer-model: the export takes the tokenizer the old checkpoint recorded (relative to the repository)
    succeeded(run("tinyllm_mcore.cli.mcore_to_hf", "--load", CKPT, "--save", tmp_path / "hf", "--quiet"))
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    exported = perplexity("--hf", tmp_path / "hf", tmp=tmp_path)
    assert exported["tokens"] == EXPECTED["evaluate_hf_export"]["tokens"]
    assert exported["loss"] == pytest.approx(EXPECTED["evaluate_hf_export"]["loss"], **TOLERANCE)


def test_metadata_round_trips_through_the_common_state():
    old = ckpt.read_checkpoint(ckpt.resolve_load_dir(CKPT)).metadata
    assert old.preset.name == "tiny-moe" and old.preset.num_experts == 0 and old.model_head == "lm"
    assert old.flags["exit_interval"] == 2 and "preset" not in old.flags
    record = old.to_dict()
    torch.save(record, "/dev/null")  # plain values only: what weights_only reads back
    assert CheckpointMetadata.from_common({KEY: record}, "x") == old
    assert CheckpointMetadata.from_common({}, "x") == CheckpointMetadata(preset=None)
    # version 0 checkpoints of reward runs from before the head was recorded
    assert CheckpointMetadata.from_common({"args": {"init_from": "lm"}}, "x").model_head == "reward"


def newer_schema_copy(tmp_path: Path) -> Path:
    """The fixture as a later version would write it: its metadata at schema version SCHEMA_VERSION + 1."""
    root = tmp_path / "newer"
    shutil.copytree(CKPT, root)
    path = ckpt.resolve_load_dir(root)
    common = torch.load(path / "common.pt", weights_only=True)
    metadata = CheckpointMetadata.from_common(common, path)
    del common["args"]
    common[KEY] = {**metadata.to_dict(), "schema_version": SCHEMA_VERSION + 1}
    torch.save(common, path / "common.pt")
    safety.write_manifest(path)
    return root


def test_a_newer_schema_version_is_one_error_line(tmp_path):
    root = newer_schema_copy(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        ckpt.read_checkpoint(ckpt.resolve_load_dir(root))
    refused = run("tinyllm_mcore.cli.generate", "--load", root, "--tokenizer-model", TOKENIZER, "--prompt", "x",
                  "--max-new-tokens", "2")
    one_error_line(refused, f"schema version {SCHEMA_VERSION + 1} is newer than this tinyllm-mcore reads",
                   str(root / "iter_0000002"))
