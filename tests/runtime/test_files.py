"""The one atomic write and staged folder (runtime/files.py): contents, a failed write leaves the old file and no
temporary, whole folders appear complete; and the source keeps one definition of each (rename, free port)."""
import ast
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pytest

from tinyllm_mcore.runtime import files

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("tinyllm_mcore", "tools", "checkpoint_convert", "benchmarks")
FILES_MODULE = REPO / "tinyllm_mcore" / "runtime" / "files.py"


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_text_and_bytes_replace_the_file(tmp_path):
    target = tmp_path / "state.json"
    assert files.atomic_write_text(target, "eins") == target
    assert files.atomic_write_text(target, "zwei 二") == target
    assert target.read_text(encoding="utf-8") == "zwei 二"
    files.atomic_write_bytes(tmp_path / "blob.bin", b"\x00\xff")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\xff"
    assert entries(tmp_path) == ["blob.bin", "state.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        files.atomic_write_text(target, "half\udc80written")  # fails midway through the write
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError, match="writer died"):
        with files.atomic_output(target) as temporary:
            temporary.write_text("partial")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert entries(tmp_path) == ["report.md"]


def test_atomic_output_gives_a_path_beside_the_target_for_writers_that_want_one(tmp_path):
    target = tmp_path / "weights.npy"
    with files.atomic_output(target) as temporary:
        assert temporary.parent == tmp_path and temporary.suffix == ".npy" and not target.exists()
        np.save(temporary, np.arange(5))  # numpy adds ".npy" to a path without it: the temporary keeps the suffix
    assert np.load(target).tolist() == [0, 1, 2, 3, 4]
    assert entries(tmp_path) == ["weights.npy"]


def test_publish_renames_a_finished_temporary(tmp_path):
    (tmp_path / "x.bin.tmp-1").write_bytes(b"new")
    (tmp_path / "x.bin").write_bytes(b"old")
    assert files.publish(tmp_path / "x.bin.tmp-1", tmp_path / "x.bin") == tmp_path / "x.bin"
    assert entries(tmp_path) == ["x.bin"] and (tmp_path / "x.bin").read_bytes() == b"new"


def test_staged_dir_appears_whole_replaces_or_merges_and_a_failure_changes_nothing(tmp_path):
    target = tmp_path / "out" / "hf"
    with files.staged_dir(target) as staged:
        assert staged.parent == target.parent and not target.exists()
        (staged / "a.txt").write_text("1")
        (staged / "b.txt").write_text("1")
    assert entries(target) == ["a.txt", "b.txt"]
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask  # a plain mkdir's mode, not mkdtemp's 0700

    with pytest.raises(ValueError, match="bad input"):
        with files.staged_dir(target) as staged:
            (staged / "a.txt").write_text("2")
            raise ValueError("bad input")
    assert entries(target) == ["a.txt", "b.txt"] and (target / "a.txt").read_text() == "1"

    with files.staged_dir(target, merge=True) as staged:  # other files stay, same names are replaced
        (staged / "a.txt").write_text("3")
        (staged / "c.txt").write_text("3")
    assert entries(target) == ["a.txt", "b.txt", "c.txt"] and (target / "a.txt").read_text() == "3"

    with files.staged_dir(target) as staged:  # replaced whole
        (staged / "d.txt").write_text("4")
    assert entries(target) == ["d.txt"]
    assert entries(target.parent) == ["hf"]  # no staged or moved-aside folder left


def test_publish_dir_of_a_new_dir_beside(tmp_path):
    target = tmp_path / "ckpt"
    staged = files.new_dir_beside(target)
    assert staged.parent == tmp_path and staged.name.startswith(".ckpt.tmp-")
    (staged / "common.pt").write_bytes(b"x")
    files.publish_dir(staged, target)
    assert entries(tmp_path) == ["ckpt"] and entries(target) == ["common.pt"]


def test_free_port_is_free():
    port = files.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def python_sources():
    for d in SOURCE_DIRS:
        yield from (p for p in sorted((REPO / d).rglob("*.py")) if "__pycache__" not in p.parts)


def renames(tree: ast.AST) -> list[int]:
    """Lines that rename a file: os.replace/os.rename/shutil.move, or Path.replace/rename (one positional argument
    and no keywords, which str.replace(old, new) and dataclasses' .replace(**changes) never are)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            if (owner, node.func.attr) in {("os", "replace"), ("os", "rename"), ("shutil", "move")} or (
                    node.func.attr in ("replace", "rename") and len(node.args) == 1 and not node.keywords):
                lines.append(node.lineno)
    return lines


def test_only_runtime_files_renames_files():
    found = {str(p.relative_to(REPO)): renames(ast.parse(p.read_text(encoding="utf-8"))) for p in python_sources()}
    assert found["tinyllm_mcore/runtime/files.py"], "the check no longer sees runtime/files.py's own rename"
    elsewhere = {path: lines for path, lines in found.items() if lines and path != "tinyllm_mcore/runtime/files.py"}
    assert not elsewhere, f"renames outside runtime/files.py (use its atomic writes): {elsewhere}"


def test_one_free_port():
    sources = [*python_sources(), *sorted((REPO / "tests").rglob("*.py"))]
    definitions = [f"{p.relative_to(REPO)}:{node.lineno}" for p in sources
                   for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                   if isinstance(node, ast.FunctionDef) and node.name in ("free_port", "_free_port")]
    assert definitions == [f"{FILES_MODULE.relative_to(REPO)}:{files.free_port.__code__.co_firstlineno}"]
