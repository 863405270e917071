"""Issue 12 fault cases of the HF converters (items 8 and 15, non-finite weights): every bad input is one `error:`
line naming the file or tensor, and a failed conversion leaves no output directory behind. In-process (the
converters are one CPU process each), on a tiny model written straight from the preset's HF shapes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinyllm_mcore.cli import hf_to_mcore, mcore_to_hf
from tinyllm_mcore.convert.hf_config import hf_config
from tinyllm_mcore.convert.mapping import hf_shapes
from tinyllm_mcore.model.presets import get_preset

PRESET = get_preset("tiny", vocab_size=256)
REPO = Path(__file__).resolve().parents[2]


def write_hf_dir(path: Path, tensors: dict | None = None, legacy_bin: bool = False) -> dict:
    """A Qwen2-layout HF directory of the tiny preset with random weights (safetensors or a legacy torch.save)."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    if tensors is None:
        tensors = {name: torch.randn(shape, generator=gen) * 0.05 for name, shape in hf_shapes(PRESET).items()}
    (path / "config.json").write_text(json.dumps(hf_config(PRESET, "qwen2")))
    if legacy_bin:  # the pre-1.6 pickle format, which torch.load cannot memory-map
        torch.save(tensors, path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    else:
        save_file(tensors, path / "model.safetensors")
    return tensors


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    tensors = write_hf_dir(root / "hf")
    assert hf_to_mcore.main(["--load", str(root / "hf"), "--save", str(root / "mc"), "--quiet"]) == 0
    return root, tensors


def test_legacy_pytorch_model_bin_converts(tmp_path, source):
    _, tensors = source
    write_hf_dir(tmp_path / "legacy", tensors, legacy_bin=True)
    assert hf_to_mcore.main(["--load", str(tmp_path / "legacy"), "--save", str(tmp_path / "mc"), "--quiet"]) == 0
    assert mcore_to_hf.main(["--load", str(tmp_path / "mc"), "--save", str(tmp_path / "back"), "--quiet"]) == 0
    back = load_file(tmp_path / "back" / "model.safetensors")
    back = {k: v for k, v in back.items() if not k.endswith("o_proj.bias")}  # the llama export's zero o_proj bias
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_is_one_line_and_never_runs(tmp_path, capsys, monkeypatch, legacy):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text(json.dumps(hf_config(PRESET, "qwen2")))
    torch.save({"model.embed_tokens.weight": _RunsCode()}, tmp_path / "evil" / "pytorch_model.bin",
               _use_new_zipfile_serialization=not legacy)
    assert hf_to_mcore.main(["--load", "evil", "--save", "out"]) == 2
    line = one_error_line(capsys)
    assert "evil/pytorch_model.bin: refused by the weights-only loader" in line and "system" in line, line
    assert not (tmp_path / "PWNED").exists() and leftovers(tmp_path) == ["evil"]


def test_truncated_and_corrupt_weight_files_name_the_file(tmp_path, capsys, source):
    root, _ = source
    blob = (root / "hf" / "model.safetensors").read_bytes()
    cases = {"trunc_st": ("model.safetensors", blob[: len(blob) // 2]),
             "garbage_st": ("model.safetensors", b"\x00" * 64),
             "trunc_bin": ("pytorch_model.bin", b"PK\x03\x04" + b"\x00" * 60)}
    for name, (file, data) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((root / "hf" / "config.json").read_text())
        (tmp_path / name / file).write_bytes(data)
        assert hf_to_mcore.main(["--load", str(tmp_path / name), "--save", str(tmp_path / f"out_{name}")]) == 2
        line = one_error_line(capsys)
        assert f"{tmp_path / name / file}: not a readable" in line and "truncated or corrupt" in line, line
    assert not any(n.startswith("out_") or n.startswith(".out_") for n in leftovers(tmp_path))


def test_bad_config_json_names_the_file(tmp_path, capsys, source):
    root, _ = source
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(root / "hf" / "model.safetensors")
    for text in ("{not json", "[1, 2]"):
        (bad / "config.json").write_text(text)
        assert hf_to_mcore.main(["--load", str(bad), "--save", str(tmp_path / "out")]) == 2
        assert f"{bad / 'config.json'}: not " in one_error_line(capsys)
    assert leftovers(tmp_path) == ["bad"]


def test_non_finite_weights_are_refused_unless_allowed(tmp_path, capsys, source):
    root, tensors = source
    poisoned = dict(tensors)
    name = "model.layers.2.mlp.down_proj.weight"
    poisoned[name] = tensors[name].clone()
    poisoned[name][3, 5] = float("nan")
    poisoned[name][0, 0] = float("inf")
    write_hf_dir(tmp_path / "nan", poisoned)
    assert hf_to_mcore.main(["--load", str(tmp_path / "nan"), "--save", str(tmp_path / "mc")]) == 2
    line = one_error_line(capsys)
    assert name in line and "2 non-finite" in line and "--allow-non-finite" in line, line
    assert not (tmp_path / "mc").exists()
    assert hf_to_mcore.main(["--load", str(tmp_path / "nan"), "--save", str(tmp_path / "mc"), "--quiet",
                             "--allow-non-finite"]) == 0
    capsys.readouterr()

    # mcore -> HF: the NaN checkpoint, and a finite weight that overflows fp16
    assert mcore_to_hf.main(["--load", str(tmp_path / "mc"), "--save", str(tmp_path / "hf_nan")]) == 2
    line = one_error_line(capsys)
    assert name in line and "decoder.layers.2.mlp.linear_fc2.weight" in line and "non-finite" in line, line
    assert not (tmp_path / "hf_nan").exists()
    big = dict(tensors)
    big["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 1e6)
    write_hf_dir(tmp_path / "big", big)
    assert hf_to_mcore.main(["--load", str(tmp_path / "big"), "--save", str(tmp_path / "mc_big"), "--quiet"]) == 0
    capsys.readouterr()
    assert mcore_to_hf.main(["--load", str(tmp_path / "mc_big"), "--save", str(tmp_path / "hf16"),
                             "--dtype", "fp16"]) == 2
    line = one_error_line(capsys)
    assert "model.norm.weight" in line and "as fp16" in line and "64 non-finite" in line, line
    assert mcore_to_hf.main(["--load", str(tmp_path / "mc_big"), "--save", str(tmp_path / "hf16"), "--dtype", "fp16",
                             "--allow-non-finite", "--quiet"]) == 0
    assert torch.isinf(load_file(tmp_path / "hf16" / "model.safetensors")["model.norm.weight"]).all()


def test_failed_export_leaves_no_directory_and_keeps_an_earlier_one(tmp_path, capsys, source):
    root, _ = source
    out = tmp_path / "export"
    assert mcore_to_hf.main(["--load", str(root / "mc"), "--save", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A bad tokenizer file is one line too.
    (tmp_path / "not_a_model").write_bytes(b"nonsense")
    assert mcore_to_hf.main(["--load", str(root / "mc"), "--save", str(out), "--quiet",
                             "--tokenizer-model", str(tmp_path / "not_a_model")]) == 2
    assert "not_a_model (8 bytes) is not a loadable SentencePiece model" in one_error_line(capsys)
    # A failure while writing (here: a NaN found after half the tensors were written) keeps the earlier export.
    _, tensors = source
    poisoned = {**tensors, "lm_head.weight": torch.full_like(tensors["lm_head.weight"], float("nan"))}
    write_hf_dir(tmp_path / "nan_hf", poisoned)
    assert hf_to_mcore.main(["--load", str(tmp_path / "nan_hf"), "--save", str(tmp_path / "nan_mc"), "--quiet",
                             "--allow-non-finite"]) == 0
    assert mcore_to_hf.main(["--load", str(tmp_path / "nan_mc"), "--save", str(out), "--quiet"]) == 2
    assert "lm_head.weight" in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == ["export", "nan_hf", "nan_mc", "not_a_model"]
    # A folder that is not an export is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert mcore_to_hf.main(["--load", str(root / "mc"), "--save", str(tmp_path / "mine")]) == 2
    assert "not an earlier output" in one_error_line(capsys)
    assert leftovers(tmp_path / "mine") == ["notes.txt"]
    # hf_to_mcore into an existing root keeps its other checkpoints and replaces only iter_0000000
    (tmp_path / "ckpt" / "iter_0000100").mkdir(parents=True)
    assert hf_to_mcore.main(["--load", str(root / "hf"), "--save", str(tmp_path / "ckpt"), "--quiet"]) == 0
    assert leftovers(tmp_path / "ckpt") == ["iter_0000000", "iter_0000100", "latest_checkpointed_iteration.txt"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_during_hf_export_is_one_line_and_leaves_nothing(tmp_path, capsys, source):
    root, _ = source
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        assert mcore_to_hf.main(["--load", str(root / "mc"), "--save", str(disk / "hf"), "--quiet"]) == 2
        line = one_error_line(capsys)
        assert "no space left on device" in line and str(disk / "hf") in line, line
        assert leftovers(disk) == []
        # as a user runs it: megatron's checkpoint writer must not log its own copy of the failure
        proc = subprocess.run([sys.executable, str(REPO / "checkpoint_convert" / "hf_to_mcore.py"), "--load",
                               str(root / "hf"), "--save", str(disk / "mc"), "--quiet"], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        err = [line for line in proc.stderr.splitlines() if "Warning" not in line and not line.startswith("  ")]
        assert proc.returncode == 2 and len(err) == 1, proc.stderr
        assert err[0].startswith("error: no space left on device") and str(disk / "mc") in err[0], err
        assert leftovers(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_bit_flip_in_a_checkpoint_shard_is_caught_before_export(tmp_path, capsys, source):
    """Issue 12 item 5 (conversion side): a flipped run of bytes in a weight shard exported silently."""
    import shutil

    root, _ = source
    ckpt = tmp_path / "mc"
    shutil.copytree(root / "mc", ckpt)
    shard = sorted((ckpt / "iter_0000000").glob("*.distcp"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2: len(blob) // 2 + 64] = bytes(b ^ 0xFF for b in blob[len(blob) // 2: len(blob) // 2 + 64])
    shard.write_bytes(bytes(blob))
    assert mcore_to_hf.main(["--load", str(ckpt), "--save", str(tmp_path / "hf")]) == 2
    line = one_error_line(capsys)
    assert f"{shard}: checksum mismatch" in line, line
    assert leftovers(tmp_path) == ["mc"]
