"""The same weights evaluated as an mcore checkpoint (TP1, TP2, PP2; gloo, 2 processes) and as its HF export make
identical per-question choices in ppl mode, with matching option scores."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.evaluation.cmmlu_fixtures import write_cmmlu_dir

WORKER = Path(__file__).with_name("mcore_eval_worker.py")
LAYOUTS = [[1, 1], [2, 1], [1, 2]]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.tiny_data import tiny_tokenizer_dir

    tmp = tmp_path_factory.mktemp("eval_parity")
    bench = write_cmmlu_dir(tmp / "cmmlu", {"agronomy": 12, "anatomy": 10, "logical": 8}, dev=3, seed=5)
    tokenizer_dir = tiny_tokenizer_dir()
    from tinyllm_mcore.tokenizer import Tokenizer

    spec = {"save": str(tmp / "ckpt"), "tokenizer": str(tokenizer_dir), "benchmark_dir": str(bench), "shots": 2,
            "vocab_size": Tokenizer.load(tokenizer_dir).vocab_size, "layouts": LAYOUTS}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={_port()}", str(WORKER), str(tmp / "spec.json"), str(tmp / "out.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    mcore = json.loads((tmp / "out.json").read_text())

    from checkpoint_convert.mcore_to_hf import convert_mcore_to_hf
    from tinyllm_mcore.evaluation.multiple_choice import evaluate_multiple_choice, load_tasks
    from tinyllm_mcore.evaluation.runner import open_hf

    convert_mcore_to_hf(tmp / "ckpt", tmp / "hf", tokenizer_model=str(tokenizer_dir), log=lambda *a, **k: None)
    lm, encoder = open_hf(str(tmp / "hf"))  # AutoModelForCausalLM + AutoTokenizer, as a user loads the export
    result = evaluate_multiple_choice(lm, encoder, load_tasks(bench, "test", 2), batch_size=5)
    hf = {"choices": {s: [r["pred"] for r in recs] for s, recs in result["records"].items()},
          "scores": {s: [r["scores"] for r in recs] for s, recs in result["records"].items()}}
    return mcore, hf


def test_every_layout_and_the_hf_export_choose_the_same(runs):
    mcore, hf = runs
    assert sum(len(v) for v in hf["choices"].values()) == 30
    for layout in ("tp1pp1", "tp2pp1", "tp1pp2"):
        assert mcore[layout]["choices"] == hf["choices"], layout


def test_option_scores_agree(runs):
    mcore, hf = runs
    for layout in ("tp1pp1", "tp2pp1", "tp1pp2"):
        for subject, scores in hf["scores"].items():
            for ours, theirs in zip(mcore[layout]["scores"][subject], scores):
                assert ours == pytest.approx(theirs, abs=1e-4), (layout, subject)
    # the choices are not decided by noise: the best option leads the runner-up clearly on most questions
    gaps = []
    for scores in hf["scores"].values():
        for s in scores:
            top = sorted(s, reverse=True)
            gaps.append(top[0] - top[1])
    assert sorted(gaps)[len(gaps) // 4] > 1e-2
