"""Writing files so that a reader sees the old version or the new one, never half of one; and a free local port.

Everything is written under a temporary name in the target's own folder (the same file system, so the final rename
is atomic) and renamed only once complete; a failure removes the temporary and leaves the target as it was.
Temporary names are hidden and carry ``.tmp-<pid>``: a leftover of a killed process says whose it was.

- ``atomic_write_text`` / ``atomic_write_bytes``: a whole file from a value.
- ``atomic_output``: a temporary path for writers that want a path (torch.save, safetensors, numpy, builders).
- ``publish``: give an already finished temporary its final name, for outputs whose several files are renamed into
  place in a chosen order (an indexed dataset: .bin, .idx, then the sidecar that describes the pair).
- ``new_dir_beside`` / ``publish_dir`` / ``staged_dir``: the same for a whole folder.

This is the one module that renames files (tests/runtime/test_files.py checks it).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator


def _temporary_name(target: Path) -> Path:
    # hidden, unique per writer, and ending like the target: writers that add a missing extension (numpy) keep it
    return target.with_name(f".{target.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}")


def publish(temporary: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the finished file (or folder) ``temporary`` onto ``target``, replacing a file there atomically."""
    os.replace(temporary, target)
    return Path(target)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it becomes ``path`` when the block succeeds and is removed when it
    fails (the old ``path``, if any, stays as it was)."""
    target = Path(path)
    temporary = _temporary_name(target)
    try:
        yield temporary
        publish(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_output(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding=encoding)
    return Path(path)


def new_dir_beside(target: str | os.PathLike) -> Path:
    """An empty folder next to ``target`` (same file system, so it can be renamed into place), created with the
    usual permissions (mkdtemp's 0700 would become the final folder's mode)."""
    target = Path(target)
    while True:
        staged = _temporary_name(target)
        try:
            staged.mkdir()
            return staged
        except FileExistsError:
            continue


def publish_dir(staged: str | os.PathLike, target: str | os.PathLike, *, merge: bool = False) -> Path:
    """Make the finished folder ``staged`` (from ``new_dir_beside``) ``target``.

    A missing ``target`` is one rename. An existing one is replaced whole (moved aside, then removed), or with
    ``merge`` keeps its other files and gets each of ``staged``'s entries renamed in (replacing those of the same
    name)."""
    staged, target = Path(staged), Path(target)
    if not target.exists():
        return publish(staged, target)
    if merge:
        for path in staged.iterdir():
            publish(path, target / path.name)
        staged.rmdir()
        return target
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    publish(target, old / "dir")
    publish(staged, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, *, merge: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``target`` that becomes ``target`` (``publish_dir``) when the block succeeds and
    is removed when it fails, so a failure leaves ``target`` as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = new_dir_beside(target)
    try:
        yield staged
        publish_dir(staged, target, merge=merge)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
