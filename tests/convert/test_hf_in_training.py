"""--save-hf and --load-hf in real training runs (tiny preset, megatron's mock data, the tiny tokenizer; 2 gloo
processes for TP2, PP2 and DP2 with the distributed optimizer in bf16): every saved iteration's hf/ folder is
byte for byte what tinyllm-mcore-to-hf writes for that checkpoint, transformers' logits on it equal the mcore
model's, its files are checksummed (by its own manifest and the checkpoint's), and a run started with --load-hf
trains exactly as --load of the converter's checkpoint of that folder with --finetune. Bad inputs are one line."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.harness.text_data import tiny_tokenizer_dir, write_text_jsonl
from tinyllm_mcore.checkpoint.safety import write_manifest
from tinyllm_mcore.convert import convert_hf_to_mcore, convert_mcore_to_hf

FLAGS = ["--model-size", "tiny", "--mock-data", "--seq-length", "32", "--global-batch-size", "4", "--lr", "1e-3",
         "--lr-warmup-iters", "0", "--log-interval", "1"]
# layout -> (processes, flags)
LAYOUTS = {
    "tp1": (1, ["--micro-batch-size", "4"]),
    "tp2": (2, ["--micro-batch-size", "4", "--tensor-model-parallel-size", "2"]),
    "pp2": (2, ["--micro-batch-size", "2", "--pipeline-model-parallel-size", "2"]),
    "dp2-distopt-bf16": (2, ["--micro-batch-size", "2", "--use-distributed-optimizer", "--bf16"]),
}
TOKENS = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(5))
quiet = lambda msg: None  # noqa: E731


def flags(layout: str, *extra) -> list[str]:
    return FLAGS + ["--tokenizer-model", str(tiny_tokenizer_dir())] + LAYOUTS[layout][1] + [str(e) for e in extra]


def hf_of(root: Path, iteration: int = 2) -> Path:
    return root / f"iter_{iteration:07d}" / "hf"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Saves with --save-hf at every layout, then (2 ranks) a resume, the mcore logits of the checkpoints, and
    --load-hf of the TP1 run's folder against --load of the converter's checkpoint of it, at TP2 and PP2."""
    from tests.harness.distributed import run_ranks

    tmp = tmp_path_factory.mktemp("hf_in_training")
    worker = "tests.convert.hf_training_worker:pretrain_run"
    parity = "tests.convert.convert_parity_worker:logits_at_layout"
    out = run_ranks(worker, 1, cases={"tp1": {"argv": flags("tp1", "--train-iters", 2, "--save", tmp / "tp1",
                                                           "--save-hf")}}, timeout=600)[0]
    converted = tmp / "tp1_converted"  # the converter's checkpoint of the TP1 run's HF folder
    convert_hf_to_mcore(hf_of(tmp / "tp1"), converted, log=quiet)
    nan_head = tmp / "nan_head"  # a folder whose lm_head (read by the last pipeline stage only) holds a NaN
    shutil.copytree(hf_of(tmp / "tp1"), nan_head)
    tensors = load_file(nan_head / "model.safetensors")
    tensors["lm_head.weight"][3, 5] = float("nan")
    save_file(tensors, nan_head / "model.safetensors", metadata={"format": "pt"})
    write_manifest(nan_head)
    cases = {
        # saves at iterations 2 and 3, each with its hf/
        "tp2": {"argv": flags("tp2", "--train-iters", 3, "--save", tmp / "tp2", "--save-interval", 2, "--save-hf")},
        "pp2": {"argv": flags("pp2", "--train-iters", 2, "--save", tmp / "pp2", "--save-hf")},
        "dp2-distopt-bf16": {"argv": flags("dp2-distopt-bf16", "--train-iters", 2, "--save", tmp / "dp2",
                                           "--save-hf")},
        # --load of a checkpoint holding hf/ (its manifest covers those files too)
        "tp2/resume": {"argv": flags("tp2", "--train-iters", 3, "--load", tmp / "tp2" / "iter_0000002")},
    }
    # a full disk while rank 0 writes hf/: both ranks stop with the same line; the next run clears the save
    cases["disk-full"] = ("tests.convert.hf_training_worker:pretrain_run_hf_disk_full", {
        "argv": flags("tp2", "--train-iters", 2, "--save", tmp / "full", "--save-hf")})
    cases["after-disk-full"] = {"argv": flags("tp2", "--train-iters", 1, "--save", tmp / "full")}
    cases["nan-head@pp2"] = {"argv": flags("pp2", "--train-iters", 1, "--load-hf", nan_head), "expect_error": True}
    for name, tp, pp in (("tp1", 2, 1), ("tp2", 2, 1), ("pp2", 1, 2)):
        cases[f"logits/{name}"] = (parity, {"ckpt": str(tmp / name / "iter_0000002"), "tp": tp, "pp": pp,
                                            "tokens": TOKENS.tolist()})
    for layout in ("tp2", "pp2"):
        cases[f"load-hf@{layout}"] = {"argv": flags(layout, "--train-iters", 2, "--load-hf", hf_of(tmp / "tp1"))}
        cases[f"load@{layout}"] = {"argv": flags(layout, "--train-iters", 2, "--load", converted, "--finetune")}
    per_rank = run_ranks(worker, 2, cases=cases, timeout=900)
    for name in cases:  # the rank holding the output: losses and logits live on the last pipeline stage
        results = [r[name] for r in per_rank if r[name].get("train") or r[name].get("logits")]
        out[name] = results[-1] if results else per_rank[0][name]
    out["disk-full/ranks"] = [r["disk-full"] for r in per_rank]
    out["nan-head/ranks"] = [r["nan-head@pp2"] for r in per_rank]
    return tmp, out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout,root", [("tp1", "tp1"), ("tp2", "tp2"), ("pp2", "pp2"),
                                         ("dp2-distopt-bf16", "dp2")])
def test_save_hf_writes_what_the_converter_writes(runs, tmp_path, layout, root):
    tmp, _ = runs
    for iteration in ((2, 3) if layout == "tp2" else (2,)):
        saved = tmp / root / f"iter_{iteration:07d}"
        exported = convert_mcore_to_hf(saved, tmp_path / f"export{iteration}", log=quiet)
        names = sorted(p.name for p in hf_of(tmp / root, iteration).iterdir())
        assert names == sorted(p.name for p in exported.iterdir())
        assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json",
                "manifest.json"} <= set(names)
        for name in names:
            assert (hf_of(tmp / root, iteration) / name).read_bytes() == (exported / name).read_bytes(), name
        # the checkpoint's own manifest covers the folder, its manifest included
        listed = json.loads((saved / "manifest.json").read_text())["files"]
        assert {f"hf/{name}" for name in names} <= set(listed)
    assert (tmp / root / "latest_checkpointed_iteration.txt").read_text() == ("3" if layout == "tp2" else "2")
    assert not [p for p in (tmp / root).rglob(".*tmp-*")]  # no staged leftovers


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["tp1", "tp2", "pp2"])
def test_save_hf_folder_logits_equal_the_mcore_model(runs, name):
    from transformers import AutoModelForCausalLM

    tmp, out = runs
    model = AutoModelForCausalLM.from_pretrained(hf_of(tmp / name)).eval()
    with torch.no_grad():
        reference = model(TOKENS).logits
    logits = torch.tensor(out[f"logits/{name}"]["logits"])
    assert logits.shape == reference.shape == (2, 24, 1000)
    assert (logits - reference).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_load_hf_trains_as_load_of_its_converted_checkpoint_with_finetune(runs, layout):
    _, out = runs
    from_hf, from_checkpoint = out[f"load-hf@{layout}"]["train"], out[f"load@{layout}"]["train"]
    assert len(from_hf) == 2 and from_hf == from_checkpoint  # exact: the same weights, optimizer and data


@pytest.mark.slow
@pytest.mark.distributed
def test_a_checkpoint_with_its_hf_folder_resumes_exactly(runs):
    _, out = runs
    assert out["tp2/resume"]["train"] == out["tp2"]["train"][2:]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failed_hf_write_stops_every_rank_and_leaves_an_incomplete_save(runs):
    tmp, out = runs
    hf = tmp / "full" / "iter_0000002" / "hf"
    errors = [r["error"] for r in out["disk-full/ranks"]]
    assert errors[0] == errors[1] and errors[0].startswith(f"no space left on device while writing {hf}"), errors
    # the next run on that --save removed the save that never got its manifest, and saved its own
    assert (tmp / "full" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in (tmp / "full").iterdir() if p.name.startswith("iter_")) == ["iter_0000001"]
    assert not [p for p in (tmp / "full").rglob(".*tmp-*")]


@pytest.mark.slow
@pytest.mark.distributed
def test_what_one_pipeline_stage_finds_wrong_stops_every_rank(runs):
    _, out = runs
    errors = [r["error"] for r in out["nan-head/ranks"]]
    assert errors[0] == errors[1] and "lm_head.weight" in errors[0] and "non-finite" in errors[0], errors


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_damaged_hf_file_is_caught_by_the_checksums(runs, tmp_path, capsys):
    from tinyllm_mcore.stages import pretrain

    tmp, _ = runs
    root = tmp_path / "tp1"
    shutil.copytree(tmp / "tp1", root)
    weights = hf_of(root) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights: the file still parses
    weights.write_bytes(bytes(data))
    assert pretrain.main(flags("tp1", "--train-iters", 1, "--load-hf", hf_of(root))) == 2
    line = _error_line(capsys)
    assert f"{weights}: checksum mismatch" in line
    assert pretrain.main(flags("tp1", "--train-iters", 3, "--load", root)) == 2  # the checkpoint's manifest too
    assert f"{weights}: checksum mismatch" in _error_line(capsys)


# ---------------------------------------------------------------------------------------------- bad inputs
def _hf_folder(path: Path, tokenizer_dir: Path | None, **config_changes) -> Path:
    """An HF folder of the tiny preset (vocab 1000) as our export lays it out, with random weights."""
    from tinyllm_mcore.convert.hf_config import hf_config
    from tinyllm_mcore.convert.mapping import hf_shapes
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.tokenizer.core import Tokenizer
    from tinyllm_mcore.tokenizer.hf_folder import write_tokenizer_folder

    preset = get_preset("tiny", vocab_size=1000)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=gen) * 0.05 for k, s in hf_shapes(preset, o_proj_bias=True).items()}
    save_file({k: v * 0 if k.endswith("o_proj.bias") else v for k, v in tensors.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({**hf_config(preset), **config_changes}))
    if tokenizer_dir is not None:
        write_tokenizer_folder(Tokenizer.load(tokenizer_dir), path)
    write_manifest(path)
    return path


def test_bad_hf_starts_are_one_line(tmp_path, capsys):
    from tinyllm_mcore.stages import pretrain
    from tinyllm_mcore.tokenizer.training import train_tokenizer

    tok_a = tiny_tokenizer_dir()
    write_text_jsonl(tmp_path / "other.jsonl", 3000, seed=7)
    tok_b = tmp_path / "tok_b"  # the same size as tokenizer A, other pieces
    train_tokenizer(str(tmp_path / "other.jsonl"), tok_b, vocab_size=1000, character_coverage=1.0, num_threads=1)
    good = _hf_folder(tmp_path / "good", tok_a)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    torch.save(load_file(good / "model.safetensors"), pickled / "pytorch_model.bin")
    run = FLAGS + ["--micro-batch-size", "4", "--train-iters", "1"]
    cases = [
        (["--tokenizer-model", tok_a, "--load-hf", good, "--load", good], "--load-hf and --load are mutually"),
        (["--tokenizer-model", tok_a, "--save-hf"], "--save-hf needs --save DIR"),
        (["--tokenizer-model", tok_a, "--load-hf", tmp_path / "nope"], f"--load-hf {tmp_path / 'nope'}: no such"),
        (["--tokenizer-model", tok_a, "--load-hf", good, "--model-size", "16m"],
         f"{good} is a tiny model and this run builds 16m (hidden_size 64 vs 120"),
        (["--tokenizer-model", tok_a, "--load-hf", _hf_folder(tmp_path / "rope", tok_a, rope_theta=5e5)],
         "rope_theta 500000.0 vs 10000.0): no --model-size preset describes it"),
        (["--load-hf", good], "has a 1000-token vocabulary and this run's tokenizer 1024"),
        (["--tokenizer-model", tok_b, "--load-hf", good], "was trained with another tokenizer"),
        (["--tokenizer-model", tok_a, "--load-hf", pickled], "only safetensors weights are read here"),
    ]
    for argv, fragment in cases:
        assert pretrain.main(run + [str(a) for a in argv]) == 2, argv
        line = _error_line(capsys)
        assert fragment in line, (argv, line)
    # the same size, deliberately another tokenizer: accepted
    assert pretrain.main(run + ["--tokenizer-model", str(tok_b), "--load-hf", str(good),
                                "--allow-tokenizer-change"]) == 0
