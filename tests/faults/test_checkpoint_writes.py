"""Saving starts no process (issue 27 item 5): megatron 0.16's writer forked a child per file bucket on every save,
from a process running gloo and OpenMP threads, where a child can deadlock and the save wait forever. Its writes now
run in threads (runtime/compat.write_checkpoints_in_process); here any fork during a run that saves (with its HF
folder, --save-hf) is an error."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_run_that_saves_never_forks(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        from tinyllm_mcore.stages import pretrain

        def refuse_fork(*args, **kwargs):
            raise RuntimeError("a process was forked")

        os.fork = refuse_fork
        os.posix_spawn = refuse_fork
        sys.exit(pretrain.main(["--model-size", "tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size",
                                "2", "--train-iters", "3", "--save-interval", "1", "--lr-warmup-iters", "0",
                                "--save", {str(tmp_path / "ckpt")!r}, "--save-hf"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert all((tmp_path / "ckpt" / f"iter_000000{i}" / "manifest.json").is_file() for i in (1, 2, 3))
    assert all((tmp_path / "ckpt" / f"iter_000000{i}" / "hf" / "model.safetensors").is_file() for i in (1, 2, 3))
