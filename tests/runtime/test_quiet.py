"""A quiet terminal (runtime/quiet.py): no library warnings on stderr, `--verbose` shows them, ours always show."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("TINYLLM_VERBOSE", None)

# A module that calls itself megatron's: warnings about itself, one about its caller, log records.
RULES = textwrap.dedent("""
    import logging, sys, types, warnings
    import tinyllm_mcore
    from tinyllm_mcore.runtime import quiet

    library = types.ModuleType("megatron.core.fake")
    exec(compile('''
    import logging, warnings
    def configure():
        warnings.warn("library about itself")
    def old_api():
        warnings.warn("library about its caller", FutureWarning, stacklevel=2)
    def log():
        logging.getLogger("megatron.core.fake").warning("library log warning")
        logging.getLogger("megatron.core.fake").error("library log error")
        logging.getLogger("torch.utils.cpp_extension").warning("torch import-time log")
    ''', "/site-packages/megatron/core/fake.py", "exec"), library.__dict__)

    library.configure()
    library.old_api()
    warnings.warn("our own warning")
    logging.getLogger("tinyllm_mcore.data.fake").warning("our own log warning")
    library.log()
    print("--- verbose", file=sys.stderr, flush=True)
    if sys.argv[1:] == ["--verbose"]:
        quiet.set_verbose()
        library.configure()  # shown once already (Python's default filter): not again
        logging.getLogger("megatron.core.fake").warning("library log after --verbose")
""")


def messages(stderr: str) -> list[str]:
    """stderr without the source lines Python prints under a warning."""
    return [line for line in stderr.splitlines() if line and not line.startswith("  ")]


def test_library_warnings_are_held_and_ours_are_not():
    quiet = subprocess.run([sys.executable, "-c", RULES], cwd=REPO, env=ENV, capture_output=True, text=True,
                           timeout=60)
    assert quiet.returncode == 0, quiet.stderr
    lines = messages(quiet.stderr)
    assert len(lines) == 5, lines
    assert "FutureWarning: library about its caller" in lines[0] and lines[0].startswith("<string>:")
    assert "UserWarning: our own warning" in lines[1]
    assert lines[2:] == ["our own log warning", "library log error", "--- verbose"]

    verbose = subprocess.run([sys.executable, "-c", RULES, "--verbose"], cwd=REPO, env=ENV, capture_output=True,
                             text=True, timeout=60)
    assert verbose.returncode == 0, verbose.stderr
    lines = messages(verbose.stderr)
    assert lines[:5] == messages(quiet.stderr)
    # what was held, in the order it came, then what comes after
    assert len(lines) == 9, lines
    assert lines[5].startswith("/site-packages/megatron/core/fake.py:")
    assert "UserWarning: library about itself" in lines[5]
    assert lines[6] == "library log warning"
    assert lines[7].endswith("torch import-time log")
    assert lines[8] == "library log after --verbose"


def run(args, verbose=False):
    proc = subprocess.run([sys.executable, *args, *(["--verbose"] if verbose else [])], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout, messages(proc.stderr)


@pytest.mark.slow
def test_real_commands_are_quiet_and_verbose_shows_why(tmp_path):
    """pretrain (mock data, a save) and SFT (a --load, a jsonl with a malformed record) print no library line; our
    own warning about the record does show. With --verbose, generate shows megatron's warnings about itself."""
    from tests.harness.text_data import tiny_tokenizer_dir

    tok = str(tiny_tokenizer_dir())
    tiny = ["--model-size", "tiny", "--tokenizer-model", tok, "--seq-length", "128", "--micro-batch-size", "2",
            "--train-iters", "2", "--log-interval", "1"]
    _, err = run(["-m", "tinyllm_mcore.stages.pretrain", *tiny, "--mock-data", "--save", str(tmp_path / "pt")])
    assert err == []

    sft = tmp_path / "sft.jsonl"
    records = [{"question": f"问题{i}", "answer": f"答案{i}"} for i in range(40)] + [{"no": "fields"}]
    sft.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    _, err = run(["-m", "tinyllm_mcore.stages.sft", *tiny, "--sft-data", str(sft), "--split", "100,0,0",
                  "--load", str(tmp_path / "pt"), "--finetune", "--save", str(tmp_path / "sft")])
    assert err and all(str(sft) in line for line in err), err  # our warnings about the data, nothing else
    assert any("skipped 1 malformed records" in line for line in err), err

    generate = ["tools/generate.py", "--load", str(tmp_path / "sft"), "--tokenizer-model", tok, "--prompt", "你好",
                "--max-new-tokens", "2"]
    out, err = run(generate)
    assert err == [] and out.strip()
    _, err = run(generate, verbose=True)
    library = [line for line in err if "/megatron/" in line and "Warning: " in line]
    assert any("Transformer Engine and Apex are not installed" in line for line in library), err
