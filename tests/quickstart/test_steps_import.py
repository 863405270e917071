"""The quickstart's steps are `python -m tinyllm_mcore...` subprocesses that import the installed package: run from a
copy of the package that is not the installed one, it refuses to start with one line saying what to install."""
import shutil
import subprocess
import sys
from pathlib import Path

import tinyllm_mcore


def test_a_package_copy_that_is_not_installed_is_refused_before_any_step(tmp_path):
    shutil.copytree(Path(tinyllm_mcore.__file__).parent, tmp_path / "tinyllm_mcore",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "tinyllm_mcore.quickstart", "--output-dir", "run", "--fast"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("error: the quickstart's steps are subprocesses, which import tinyllm_mcore from ")
    assert lines[0].endswith(f"(this is {tmp_path / 'tinyllm_mcore'}): run `pip install -e .` in {tmp_path}")
    assert not (tmp_path / "run").exists()
