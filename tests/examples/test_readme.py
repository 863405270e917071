"""README.md's commands, run for real: every command in its ```bash blocks is executed in README order at a tiny size,
so a renamed flag or a bad default (a fixed --min-lr above DPO's --lr once crashed the README's DPO command) fails
here.

Only sizes and paths are substituted (``tiny_command``): --model-size tiny, small vocab / batch / sequence / iteration
counts, at most 2 processes (``--nproc-per-node 8`` becomes the TP x PP the command needs, PP dropping to 1 when
TP x PP > 2), a free rendezvous port, the checkout's scripts, and a scratch directory holding the inputs the README
assumes (corpus.jsonl[.gz], sft.jsonl, dpo.jsonl, cmmlu/). A --data-path prefix that no README command writes (the
blend's second corpus) is a copy of the first. A command whose inputs another, later command writes (the README
evaluates an HF export before its release step makes one) runs after the others. Every command must exit 0 without a
traceback.

Not run here: ``pip install`` lines (the environment is already installed), ``python -m pytest`` (this suite) and
``python -m tinyllm_mcore.quickstart`` — the quickstart runs in full in tests/quickstart/test_quickstart_e2e.py,
which ``test_quickstart_command_runs_elsewhere`` checks.
"""
import gzip
import importlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"

# flag -> tiny value (sizes only; everything else stays as written)
TINY_SIZES = {
    "--model-size": "tiny", "--vocab-size": "1000", "--micro-batch-size": "2", "--global-batch-size": "4",
    "--seq-length": "128", "--train-iters": "4", "--save-interval": "2", "--eval-interval": "2", "--eval-iters": "1",
    "--log-interval": "1", "--max-new-tokens": "8", "--workers": "2",
}
# Size flags a tiny run needs where the README relies on a default: chat/generate's default answer length is as
# long as the tiny model's whole context.
ADDED_SIZES = {"--max-new-tokens": "8"}
MAX_PROCESSES = 2
# Flags whose values a command reads (so it must wait for the command that writes them).
INPUT_FLAGS = ("--load", "--load-hf", "--hf", "--tokenizer-model", "--input", "--sft-data", "--preference-data",
               "--benchmark-dir", "--data-path")
SCRIPT_DIRS = ("tools/", "checkpoint_convert/", "examples/")
RUN_ELSEWHERE = {"tinyllm_mcore.quickstart": "tests/quickstart/test_quickstart_e2e.py",
                 "tinyllm_mcore.quickstart.rl": "tests/quickstart/test_rl.py", "pytest": "this suite"}


def readme_commands() -> list[list[str]]:
    """Each command of README.md's bash blocks as words (continuations joined, `a && b` split)."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.strip(), comments=True)
                if words:
                    commands.append(words)
    return commands


def program(words: list[str]) -> list[str]:
    """The command without leading VAR=value assignments."""
    i = 0
    while i < len(words) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[i]):
        i += 1
    return words[i:]


def module_of(words: list[str]) -> str | None:
    words = program(words)
    if "-m" in words:
        return words[words.index("-m") + 1]
    return None


def skip_reason(words: list[str]) -> str | None:
    words = program(words)
    if not words:
        return "sets variables only"
    if words[0] == "pip":
        return "installs packages"
    return RUN_ELSEWHERE.get(module_of(words) or "")


def flag_value(words: list[str], flag: str, default=None):
    return words[words.index(flag) + 1] if flag in words else default


def set_flag(words: list[str], flag: str, value: str) -> None:
    if flag in words:
        words[words.index(flag) + 1] = value


def cli_module(words: list[str]) -> str | None:
    """The module a python/torchrun command runs: `-m X`, or for a checkout script (tools/x.py) the CLI module it
    takes `main` from (the scripts are two lines: import main, run it)."""
    words = program(words)
    if words[0] not in ("python", "torchrun"):
        return None
    if "-m" in words:
        return words[words.index("-m") + 1]
    script = (REPO / words[1]).read_text(encoding="utf-8")
    found = re.search(r"^from ([\w.]+) import main$", script, flags=re.M)
    assert found, f"{words[1]} is not a thin script over a package CLI"
    return found.group(1)


def cli_parser(words: list[str]):
    """The argparse parser of a python/torchrun command (None for other programs)."""
    module = cli_module(words)
    if module is None:
        return None
    mod = importlib.import_module(module)
    if hasattr(mod, "__path__"):  # `python -m package` runs package/__main__.py
        mod = importlib.import_module(module + ".__main__")
    if hasattr(mod, "STAGE"):
        from tinyllm_mcore.training.arguments import build_parser

        return build_parser(module, mod.STAGE.extra_args)
    if hasattr(mod, "build_parser"):
        return mod.build_parser()
    return None


def cli_flags(words: list[str]) -> set[str]:
    parser = cli_parser(words)
    return {s for action in parser._actions for s in action.option_strings} if parser else set()


def tiny_command(words: list[str]) -> tuple[dict, list[str]]:
    """(environment assignments, argv) of a README command at the tiny size (see the module docstring)."""
    words = list(words)
    env = {}
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    for i, word in enumerate(words[:-1]):
        if word in TINY_SIZES:
            words[i + 1] = TINY_SIZES[word]
    accepted = cli_flags(words)
    for flag, value in ADDED_SIZES.items():
        if flag in accepted and flag not in words:
            words += [flag, value]
    tp = int(flag_value(words, "--tensor-model-parallel-size", 1))
    pp = int(flag_value(words, "--pipeline-model-parallel-size", 1))
    if tp * pp > MAX_PROCESSES:
        pp = 1
        set_flag(words, "--pipeline-model-parallel-size", "1")
    if tp > MAX_PROCESSES:
        tp = MAX_PROCESSES
        set_flag(words, "--tensor-model-parallel-size", str(tp))
    set_flag(words, "--nproc-per-node", str(tp * pp))
    words = [str(REPO / w) if w.startswith(SCRIPT_DIRS) else w for w in words]
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", "--master-port", str(free_port()), *words[1:]]
    elif words[0] == "python":
        words[0] = sys.executable
    return env, words


def input_paths(words: list[str]) -> list[str]:
    """Paths the command reads (data prefixes with their .bin)."""
    paths = []
    for i, word in enumerate(words):
        if word not in INPUT_FLAGS:
            continue
        for value in words[i + 1:]:
            if value.startswith("--"):
                break
            if word == "--data-path":
                if not re.fullmatch(r"[0-9.eE+-]+", value):
                    paths.append(value + ".bin")
            else:
                paths.append(value)
    return paths


def complete_blend(words: list[str], cwd: Path) -> None:
    """A --data-path prefix that no README command writes becomes a copy of the first one that exists."""
    prefixes = [p[:-len(".bin")] for p in input_paths(words) if p.endswith(".bin")]
    existing = [p for p in prefixes if (cwd / f"{p}.bin").is_file()]
    if not existing:
        return
    for prefix in prefixes:
        if not (cwd / f"{prefix}.bin").is_file():
            for suffix in (".bin", ".idx", ".json"):
                if (cwd / f"{existing[0]}{suffix}").is_file():
                    shutil.copy(cwd / f"{existing[0]}{suffix}", cwd / f"{prefix}{suffix}")


def write_inputs(cwd: Path) -> None:
    """The files the README's commands assume: a text corpus (jsonl and jsonl.gz), SFT and DPO jsonl, a CMMLU dir."""
    from tests.harness.cmmlu import write_cmmlu_dir
    from tests.harness.text_data import random_text, write_text_jsonl

    write_text_jsonl(cwd / "corpus.jsonl", 1500, seed=11)
    with open(cwd / "corpus.jsonl", "rb") as f, gzip.open(cwd / "corpus.jsonl.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    rng = random.Random(12)
    with open(cwd / "sft.jsonl", "w", encoding="utf-8") as f:
        for _ in range(64):
            f.write(json.dumps({"question": random_text(rng, 3, 20), "answer": random_text(rng, 3, 30)},
                               ensure_ascii=False) + "\n")
    with open(cwd / "dpo.jsonl", "w", encoding="utf-8") as f:
        for _ in range(64):
            f.write(json.dumps({"prompt": random_text(rng, 3, 20), "chosen": random_text(rng, 3, 20),
                                "rejected": random_text(rng, 3, 20)}, ensure_ascii=False) + "\n")
    write_cmmlu_dir(cwd / "cmmlu", {"agronomy": 4, "chinese_history": 3}, dev=5)


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


COMMANDS = readme_commands()


def test_readme_has_the_two_commands():
    modules = [module_of(c) for c in COMMANDS]
    assert "tinyllm_mcore.quickstart" in modules and "pytest" in modules
    assert sum(skip_reason(c) is None for c in COMMANDS) >= 12


@pytest.mark.parametrize("module", ["tinyllm_mcore.quickstart", "tinyllm_mcore.quickstart.rl"])
def test_quickstart_commands_run_elsewhere(module):
    assert module in [module_of(c) for c in COMMANDS]
    test = (REPO / RUN_ELSEWHERE[module]).read_text(encoding="utf-8")
    assert f'"-m", "{module}"' in test


@pytest.mark.slow
@pytest.mark.distributed  # the README's torchrun commands run on 2 processes
def test_every_readme_command_runs_at_a_tiny_size(tmp_path):
    write_inputs(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the installed package: no PYTHONPATH
    pending = [c for c in COMMANDS if skip_reason(c) is None]
    report, deferred = [], []
    for attempt in range(2):
        for words in pending:
            assignments, argv = tiny_command(words)
            complete_blend(argv, tmp_path)
            missing = [p for p in input_paths(argv) if not (tmp_path / p).exists()]
            if missing:
                assert attempt == 0, f"{shlex.join(words)}: no README command writes {missing}"
                deferred.append(words)
                continue
            start, cpu = time.perf_counter(), children_cpu_seconds()
            proc = subprocess.run(argv, cwd=tmp_path, env={**env, **assignments}, input="你好\n/exit\n",
                                  capture_output=True, text=True, timeout=600)
            report.append(f"{time.perf_counter() - start:5.1f} s wall {children_cpu_seconds() - cpu:5.1f} s cpu  "
                          f"rc {proc.returncode}  {shlex.join(words)[:100]}")
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, (
                f"README command failed at the tiny size:\n  {shlex.join(words)}\nran as:\n  {shlex.join(argv)}\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n" + "\n".join(report))
        pending, deferred = deferred, []
    print("\n".join(report))
    assert len(report) == sum(skip_reason(c) is None for c in COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_readme_command_parses(words):
    """Fast feedback before the run above: each python/torchrun command parses with its real CLI parser."""
    if skip_reason(words):
        return
    parser = cli_parser(words)
    words = program(words)
    argv = words[words.index("-m") + 2:] if "-m" in words else words[2:]
    if parser is not None:
        parser.parse_args(argv)
    elif words[0] in ("python", "torchrun"):  # CLIs with a parse_args(argv) function
        importlib.import_module(cli_module(words)).parse_args(argv)
