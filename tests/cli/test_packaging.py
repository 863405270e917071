"""What `pip install .` installs: the wheel holds the tinyllm_mcore package and nothing else at the top level (no
`tools`, `benchmarks`, `checkpoint_convert` or `tests` packages to collide with other projects), every module of the
package, and a console script per command, each naming a `main(argv=None)` that exists. Two installed console scripts
run for real."""
import configparser
import importlib
import inspect
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.cli.checkout_scripts import REPO, console_script, run, the_error_line

# Every command of the package (README.md, "Commands"): the wheel must install exactly these console scripts.
COMMANDS = ("tinyllm-train-tokenizer", "tinyllm-preprocess-data", "tinyllm-merge-datasets", "tinyllm-pretrain",
            "tinyllm-sft", "tinyllm-dpo", "tinyllm-reward", "tinyllm-grpo", "tinyllm-chat", "tinyllm-generate", "tinyllm-evaluate",
            "tinyllm-hf-to-mcore", "tinyllm-mcore-to-hf", "tinyllm-quickstart", "tinyllm-quickstart-rl")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel `pip install .` would install, built from a copy of the checkout (the build leaves build/ and
    *.egg-info behind, which must not land in the working tree)."""
    root = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, root / "src", ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", "work", "quickstart_run", "quickstart_rl", "*.bin", "*.idx"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(root / "dist"), str(root / "src")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (root / "dist").glob("tinyllm_mcore-*.whl")
    with zipfile.ZipFile(path) as whl:
        yield whl


def test_the_wheel_installs_only_the_package(wheel):
    names = wheel.namelist()
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert {n.split("/")[0] for n in names} == {"tinyllm_mcore", dist_info}
    # every module of the package is in it (a folder without __init__.py would be left out silently)
    source = {p.relative_to(REPO).as_posix() for p in (REPO / "tinyllm_mcore").rglob("*.py")
              if "__pycache__" not in p.parts}
    assert source == {n for n in names if n.endswith(".py")}


def test_every_command_is_a_console_script_of_a_main_function(wheel):
    entry_points = configparser.ConfigParser(delimiters=("=",))
    entry_points.read_string(next(wheel.read(n).decode() for n in wheel.namelist() if n.endswith("/entry_points.txt")))
    scripts = dict(entry_points["console_scripts"])
    assert sorted(scripts) == sorted(COMMANDS)
    for command, target in scripts.items():
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function, None)
        assert callable(main), f"{command}: {target} is not a function"
        parameters = list(inspect.signature(main).parameters.values())
        assert [(p.name, p.default) for p in parameters] == [("argv", None)], f"{command}: {target}{parameters}"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert [c for c in COMMANDS if f"`{c}`" not in readme] == [], "README's Commands table misses these"


def test_installed_console_scripts_run(tmp_path):
    """Run from a scratch directory: the scripts import the installed package, not the checkout beside them."""
    proc = run([console_script("tinyllm-preprocess-data"), "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tinyllm-preprocess-data "), proc.stderr
    assert "--output-prefix" in proc.stdout
    (tmp_path / "one.jsonl").write_text('{"text": "你好"}\n', encoding="utf-8")
    proc = run([console_script("tinyllm-train-tokenizer"), "--input", "one.jsonl", "--output-dir", "tok",
                "--vocab-size", "0"], cwd=tmp_path)
    assert "--vocab-size 0 is too small" in the_error_line(proc) and proc.returncode == 1
    assert not (tmp_path / "tok").exists()
