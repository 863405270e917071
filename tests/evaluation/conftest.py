"""A random tiny mcore checkpoint (saved at TP2), its ppl-mode results at TP1/TP2/PP2 (2 gloo processes, one launch)
and its HF export — shared by the parity and lm-eval agreement tests (both marked distributed)."""
import pytest

from tests.harness.cmmlu import write_cmmlu_dir
from tests.harness.distributed import run_ranks

WORKER = "tests.evaluation.mcore_eval_worker"
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
SHOTS = 2


@pytest.fixture(scope="session")
def mcore_export(tmp_path_factory):
    """{"bench": CMMLU dir, "hf": export dir, "tokenizer": dir, "mcore": {layout: {"choices", "scores"}}}"""
    from tests.harness.text_data import tiny_tokenizer_dir
    from tinyllm_mcore.tokenizer.core import Tokenizer

    tmp = tmp_path_factory.mktemp("eval_export")
    bench = write_cmmlu_dir(tmp / "cmmlu", {"agronomy": 12, "anatomy": 10, "logical": 8}, dev=3, seed=5)
    tokenizer_dir = tiny_tokenizer_dir()
    save = str(tmp / "ckpt")
    shared = {"save": save, "tokenizer": str(tokenizer_dir), "benchmark_dir": str(bench), "shots": SHOTS}
    cases = {"checkpoint": (f"{WORKER}:save_random_checkpoint",
                            {"save": save, "vocab_size": Tokenizer.load(tokenizer_dir).vocab_size}),
             **{f"tp{tp}pp{pp}": (f"{WORKER}:evaluate_layout", {**shared, "tp": tp, "pp": pp}) for tp, pp in LAYOUTS}}
    results = run_ranks(None, nproc=2, cases=cases)[0]  # rank 0 holds the results of every layout

    from tinyllm_mcore.convert import convert_mcore_to_hf

    convert_mcore_to_hf(tmp / "ckpt", tmp / "hf", tokenizer_model=str(tokenizer_dir), log=lambda *a, **k: None)
    return {"bench": bench, "hf": tmp / "hf", "tokenizer": tokenizer_dir, "shots": SHOTS,
            "mcore": {layout: results[layout] for layout in results if layout != "checkpoint"}}
