"""A random tiny mcore checkpoint (saved at TP2), its ppl-mode results at TP1/TP2/PP2 (2 gloo processes, one launch)
and its HF export — shared by the parity and lm-eval agreement tests."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.evaluation.cmmlu_fixtures import write_cmmlu_dir

WORKER = Path(__file__).with_name("mcore_eval_worker.py")
LAYOUTS = [[1, 1], [2, 1], [1, 2]]
SHOTS = 2


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mcore_export(tmp_path_factory):
    """{"bench": CMMLU dir, "hf": export dir, "tokenizer": dir, "mcore": {layout: {"choices", "scores"}}}"""
    from tests.harness.text_data import tiny_tokenizer_dir
    from tinyllm_mcore.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("eval_export")
    bench = write_cmmlu_dir(tmp / "cmmlu", {"agronomy": 12, "anatomy": 10, "logical": 8}, dev=3, seed=5)
    tokenizer_dir = tiny_tokenizer_dir()
    spec = {"save": str(tmp / "ckpt"), "tokenizer": str(tokenizer_dir), "benchmark_dir": str(bench), "shots": SHOTS,
            "vocab_size": Tokenizer.load(tokenizer_dir).vocab_size, "layouts": LAYOUTS}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={_port()}", str(WORKER), str(tmp / "spec.json"), str(tmp / "out.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    from checkpoint_convert.mcore_to_hf import convert_mcore_to_hf

    convert_mcore_to_hf(tmp / "ckpt", tmp / "hf", tokenizer_model=str(tokenizer_dir), log=lambda *a, **k: None)
    return {"bench": bench, "hf": tmp / "hf", "tokenizer": tokenizer_dir, "shots": SHOTS,
            "mcore": json.loads((tmp / "out.json").read_text())}
