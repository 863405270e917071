"""cli.merge_datasets: Megatron-LM's flags; N parts merged equal one pass over the whole; tokenizers, modes and
mismatched pairs refused in one line; memory flat in dataset size; `python tools/merge_datasets.py` as a script."""
import json
import shutil
import tracemalloc

import numpy as np
import pytest

from tests.cli.checkout_scripts import run, tool_command
from tests.harness.hf_tokenizer import tiny_hf_tokenizer_dir
from tests.harness.text_data import tiny_tokenizer_dir, write_text_jsonl
from tinyllm_mcore.data.vocab_contract import read_sidecar
from tinyllm_mcore.cli import merge_datasets, preprocess_data


def preprocess(inputs, prefix, *extra, tokenizer=None):
    assert preprocess_data.main(["--input", *map(str, inputs), "--output-prefix", str(prefix), "--tokenizer-model",
                                 str(tokenizer or tiny_tokenizer_dir()), "--append-eod", "--no-progress",
                                 *extra]) == 0


def pair_bytes(prefix):
    return [open(f"{prefix}{s}", "rb").read() for s in (".bin", ".idx")]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Three corpus files preprocessed one by one into parts/, and the texts of each."""
    root = tmp_path_factory.mktemp("merge")
    (root / "parts").mkdir()
    for name, n, seed in (("a", 40, 1), ("b", 1, 2), ("c", 25, 3)):
        write_text_jsonl(root / f"{name}.jsonl", n, seed=seed)
        preprocess([root / f"{name}.jsonl"], root / "parts" / name)
    return root


@pytest.mark.parametrize("order", ["abc", "cab"])
def test_merging_parts_equals_one_pass_over_the_whole(parts, tmp_path, capsys, order):
    whole = tmp_path / "whole.jsonl"
    whole.write_bytes(b"".join((parts / f"{n}.jsonl").read_bytes() for n in order))
    preprocess([whole], tmp_path / "one")
    if order == "abc":  # Megatron-LM's spelling: a folder, merged in sorted prefix order (sidecars are skipped)
        args = ["--input", str(parts / "parts")]
    else:
        args = ["--input", *(str(parts / "parts" / f"{n}_text_document") for n in order)]
    assert merge_datasets.main(args + ["--output-prefix", str(tmp_path / "merged" / "m")]) == 0
    assert "merged 3 datasets" in capsys.readouterr().out
    assert pair_bytes(tmp_path / "merged" / "m") == pair_bytes(tmp_path / "one_text_document")
    merged, one = read_sidecar(tmp_path / "merged" / "m"), read_sidecar(tmp_path / "one_text_document")
    for key in ("tokenizer", "mode", "json_key", "level", "dtype", "max_token_id", "tokens", "sequences",
                "documents", "bin_bytes", "idx_bytes"):
        assert merged[key] == one[key], key


def test_different_tokenizers_modes_or_broken_pairs_are_refused(parts, tmp_path, capsys):
    write_text_jsonl(tmp_path / "x.jsonl", 5, seed=4)
    preprocess([tmp_path / "x.jsonl"], tmp_path / "hf", tokenizer=tiny_hf_tokenizer_dir())
    (tmp_path / "sft.jsonl").write_text(json.dumps({"question": "一", "answer": "二"}, ensure_ascii=False) + "\n")
    assert preprocess_data.main(["--mode", "sft", "--input", str(tmp_path / "sft.jsonl"), "--output-prefix",
                                 str(tmp_path / "s"), "--tokenizer-model", str(tiny_tokenizer_dir()),
                                 "--no-progress"]) == 0
    shutil.copy(parts / "parts" / "a_text_document.idx", tmp_path / "broken.idx")
    shutil.copy(parts / "parts" / "c_text_document.bin", tmp_path / "broken.bin")
    a = str(parts / "parts" / "a_text_document")
    for inputs, message in (([a, str(tmp_path / "hf_text_document")], "different tokenizers"),
                            ([a, str(tmp_path / "s_sft_document")], "different modes"),
                            ([a, str(tmp_path / "broken")], "the pair does not match"),
                            ([a, str(tmp_path / "missing")], "missing.idx not found")):
        assert merge_datasets.main(["--input", *inputs, "--output-prefix", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and err.count("\n") == 0 and message in err, err
    assert not list(tmp_path.glob("out*"))
    assert merge_datasets.main(["--input", str(tmp_path), "--output-prefix", str(tmp_path / "o"),
                                "--multimodal"]) == 1
    assert "--multimodal is not supported" in capsys.readouterr().err


def test_inputs_without_a_sidecar_merge_without_one(parts, tmp_path, capsys):
    """Data made by Megatron-LM's own tool has no sidecar: it still merges; nothing is claimed about the result."""
    for name in ("a", "c"):
        for suffix in (".bin", ".idx"):
            shutil.copy(parts / "parts" / f"{name}_text_document{suffix}", tmp_path / f"{name}{suffix}")
    shutil.copy(parts / "parts" / "a_text_document.json", tmp_path / "a.json")
    (tmp_path / "m.json").write_text("stale")
    assert merge_datasets.main(["--input", str(tmp_path / "a"), str(tmp_path / "c"), "--output-prefix",
                                str(tmp_path / "m")]) == 0
    assert "1 of 2 inputs have no vocabulary sidecar" in capsys.readouterr().out
    assert not (tmp_path / "m.json").exists() and (tmp_path / "m.idx").is_file()


def make_datasets(folder, sequences, seed=0):
    from tinyllm_mcore.data.indexed_files import make_builder

    rng = np.random.default_rng(seed)
    folder.mkdir()
    prefixes = []
    for name in ("p0", "p1"):
        builder = make_builder(str(folder / f"{name}.bin"), np.uint16)
        lengths = rng.integers(1, 6, size=sequences).astype(np.int32)
        per_doc = np.full(sequences // 3, 3, dtype=np.int32)
        builder.add_chunk(rng.integers(0, 60000, size=int(lengths.sum())).astype(np.uint16), lengths, per_doc)
        builder.finalize(str(folder / f"{name}.idx"))
        prefixes.append(str(folder / name))
    return prefixes


def test_merge_memory_is_flat_and_files_equal_megatron_core_add_index(tmp_path):
    """Merging 2 x 600k sequences peaks at the same memory as 2 x 60k (a few streamed blocks; Megatron-LM's tool
    holds the whole index in Python lists), and writes what megatron-core's IndexedDatasetBuilder.add_index writes."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from tinyllm_mcore.data.indexed_files import IndexSummary, merge_indexed

    peaks = {}
    for sequences in (60_000, 600_000):
        prefixes = make_datasets(tmp_path / str(sequences), sequences)
        inputs = [IndexSummary(p) for p in prefixes]
        tracemalloc.start()
        merge_indexed(inputs, str(tmp_path / f"{sequences}.bin"), str(tmp_path / f"{sequences}.idx"), block=4096)
        peaks[sequences] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    index_bytes = (tmp_path / "600000.idx").stat().st_size
    assert peaks[600_000] < 1.2 * peaks[60_000] + 100_000 and peaks[600_000] < index_bytes / 4, (peaks, index_bytes)
    reference = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for prefix in prefixes:
        reference.add_index(prefix)
    reference.finalize(str(tmp_path / "ref.idx"))
    assert pair_bytes(tmp_path / "600000") == pair_bytes(tmp_path / "ref")


def test_runs_as_a_script(parts, tmp_path):
    """`python tools/merge_datasets.py` (a checkout script, run from another folder) writes what the function
    writes."""
    proc = run(tool_command("merge_datasets", "--input", parts / "parts", "--output-prefix", tmp_path / "script"),
               cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("merged 3 datasets: "), proc.stderr
    assert merge_datasets.main(["--input", str(parts / "parts"), "--output-prefix", str(tmp_path / "function")]) == 0
    assert pair_bytes(tmp_path / "script") == pair_bytes(tmp_path / "function")
