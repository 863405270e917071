"""The test tree mirrors the package, and nothing edits the import path: tests import `tests.*` because `tests` is a
package run from the repository root, scripts import the installed `tinyllm_mcore`. Cheap: reads files only."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PACKAGE = REPO / "tinyllm_mcore"

# tests/<area> -> what it tests: files or folders that must exist (None: the shared helpers and the worker harness)
AREAS = {
    "model": ["tinyllm_mcore/model"],
    "inference": ["tinyllm_mcore/inference"],
    "tokenizer": ["tinyllm_mcore/tokenizer"],
    "checkpoint": ["tinyllm_mcore/checkpoint"],
    "stages": ["tinyllm_mcore/stages"],
    "training": ["tinyllm_mcore/training"],
    "data": ["tinyllm_mcore/data"],
    "evaluation": ["tinyllm_mcore/evaluation"],
    "runtime": ["tinyllm_mcore/runtime"],
    "convert": ["tinyllm_mcore/convert"],
    "cli": ["tinyllm_mcore/cli"],
    "quickstart": ["tinyllm_mcore/quickstart"],
    "examples": ["examples", "README.md"],
    "harness": None,
    "faults": None,  # fault injection across areas: real processes and files (issue 27)
    "fixtures": None,  # committed files older versions wrote (each folder's README says how it was made)
}
TOP_LEVEL_FILES = {"__init__.py", "conftest.py", "test_layout.py"}
# Python code that must import through the installed package or the `tests` package, never by editing the path.
SOURCE_DIRS = ("tests", "tools", "benchmarks", "checkpoint_convert", "tinyllm_mcore")
PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend)\s*\(|\[[^\]]*\]\s*=|\+?=)")
PYTHONPATH_SET = re.compile(r"""PYTHONPATH["']?\s*[:=]""")


def python_files(*dirs: str):
    for d in dirs:
        yield from (p for p in sorted((REPO / d).rglob("*.py")) if "__pycache__" not in p.parts)


def folders_with_files() -> list[Path]:
    """Folders under tests/ with files (a folder left holding only __pycache__ after a move is not in git)."""
    return [d for d in sorted(TESTS.rglob("*")) if d.is_dir() and "__pycache__" not in d.parts
            and any(f.is_file() and "__pycache__" not in f.parts for f in d.rglob("*"))]


def test_no_import_path_edits():
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in python_files(*SOURCE_DIRS)
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if PATH_EDIT.search(line)]
    assert not offenders, f"edits sys.path (import the installed package or `tests.*` instead): {offenders}"


def test_tests_run_commands_without_pythonpath():
    """Subprocesses in tests run what a user runs: the installed package (workers: `python -m tests.…`, cwd = repo)."""
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in python_files("tests")
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if PYTHONPATH_SET.search(line)]
    assert not offenders, f"PYTHONPATH set in {offenders}"


def test_every_test_folder_is_a_package():
    """Fixture data (a checkpoint's folders) is not code: there only the folders with Python files are packages."""
    missing = [str(d.relative_to(REPO)) for d in folders_with_files() if not (d / "__init__.py").is_file()
               and ("fixtures" not in d.relative_to(TESTS).parts or any(d.glob("*.py")))]
    assert not missing, f"no __init__.py: {missing}"


def test_module_basenames_are_unique():
    seen: dict[str, list[str]] = {}
    for p in python_files("tests"):
        if p.name not in ("__init__.py", "conftest.py"):
            seen.setdefault(p.name, []).append(str(p.relative_to(REPO)))
    assert not {name: paths for name, paths in seen.items() if len(paths) > 1}


def test_test_folders_mirror_the_package():
    folders = {d.name for d in folders_with_files() if d.parent == TESTS}
    assert folders <= AREAS.keys(), f"test folders without a package area: {sorted(folders - AREAS.keys())}"
    for area, targets in AREAS.items():
        for target in targets or ():
            assert (REPO / target).exists(), f"tests/{area} tests {target}, which does not exist"
    loose = sorted(p.name for p in TESTS.glob("*.py") if p.name not in TOP_LEVEL_FILES)
    assert not loose, f"test files outside an area folder: {loose}"


def test_every_package_area_has_tests():
    """Each sub-package of tinyllm_mcore is an area with its own test folder, and no module sits loose at the top."""
    packages = {d.name for d in PACKAGE.iterdir() if d.is_dir() and (d / "__init__.py").is_file()}
    covered = {Path(t).name for targets in AREAS.values() for t in targets or () if t.startswith("tinyllm_mcore/")}
    assert packages == covered, f"packages without a test area: {sorted(packages - covered)}"
    for area in covered:
        assert any((TESTS / area).glob("test_*.py")), f"tests/{area} has no tests"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside a package area: {loose}"
