"""`python -m tinyllm_mcore.pretrain`: bad input gives one clear line and exit code 2, before any heavy work."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, env_extra=None, timeout=120):
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "tinyllm_mcore.pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr.strip().splitlines()


BASE = ["--model-size", "tiny", "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "2"]


@pytest.mark.parametrize("args,env,message", [
    (["--data-path", "/nonexistent/corpus_text_document"], None, "data prefix '/nonexistent/corpus_text_document'"),
    (["--data-path", "0.3", "/nope/a", "0.7", "/nope/b"], None, "/nope/a.bin not found"),
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
