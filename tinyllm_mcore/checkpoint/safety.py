"""What keeps checkpoints trustworthy when things go wrong: checksums, one run per save folder, no orphaned writers,
no half-written leftovers.

- Manifest: after every rank finished writing, rank 0 records each file's size and CRC-32 (`manifest.json`, written
  last, before the latest pointer moves). Loading verifies it and names the bad file in one line; a bit flip inside
  a shard is caught before a single tensor is used (`--no-verify-checkpoint` skips it).
- Lock: the run that saves into a folder holds an exclusive `flock` on `SAVE/.run.lock` for its lifetime; the kernel
  releases it however the process dies, so a second run on the same `--save` is refused, never interleaved.
- Writers: no save starts a process (megatron's writer runs in threads: runtime/compat.write_checkpoints_in_process),
  so a `kill -9` of a trainer mid-save leaves nothing running and no forked child can deadlock a save.
- Pointer: `SAVE/latest_checkpointed_iteration.txt` names the latest complete save (`read_tracker`, the one parse of
  it); it moves only after that save's manifest is written.
- Leftovers: `iter_*` folders past the latest pointer without a manifest (a save that died) are removed at the
  next start, and reported.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import zlib
from pathlib import Path

from tinyllm_mcore.runtime.files import atomic_write_text

MANIFEST = "manifest.json"
TRACKER = "latest_checkpointed_iteration.txt"  # the latest pointer of a save root: moved only onto complete saves
LOCK = ".run.lock"
_CHUNK = 16 << 20


class CheckpointIntegrityError(ValueError):
    """A checkpoint whose files do not match their manifest (reported as one line by the CLIs)."""


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_manifest(checkpoint_dir: Path) -> None:
    # every file but this manifest (a folder inside, such as --save-hf's hf/, may have its own, which is listed)
    files = sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p != checkpoint_dir / MANIFEST)
    manifest = {"format": 1, "files": {str(p.relative_to(checkpoint_dir)): {"size": p.stat().st_size,
                                                                          "crc32": _crc32(p)} for p in files}}
    atomic_write_text(checkpoint_dir / MANIFEST, json.dumps(manifest, indent=1))


def manifest_checksum(checkpoint_dir: Path) -> str | None:
    """sha256 of the manifest (which holds every file's size and crc32): one value naming the checkpoint's content.
    None without a manifest."""
    import hashlib

    path = Path(checkpoint_dir) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def has_manifest(checkpoint_dir: Path) -> bool:
    return (checkpoint_dir / MANIFEST).is_file()


def verify(checkpoint_dir: Path) -> bool:
    """Check every file against the manifest; False when the checkpoint has none (written before manifests)."""
    manifest_path = checkpoint_dir / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        entries = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointIntegrityError(f"{manifest_path}: unreadable manifest (corrupt)") from None
    hint = "the checkpoint is corrupt (--no-verify-checkpoint loads it anyway)"
    for name, expected in entries.items():
        path = checkpoint_dir / name
        if not path.is_file():
            raise CheckpointIntegrityError(f"{path}: missing; {hint}")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointIntegrityError(f"{path}: {size} bytes, manifest says {expected['size']}; {hint}")
        if _crc32(path) != expected["crc32"]:
            raise CheckpointIntegrityError(f"{path}: checksum mismatch; {hint}")
    return True


def read_tracker(save_dir: str | os.PathLike) -> int | str | None:
    """What the latest pointer of a save root holds: an iteration number, "release", or None without a pointer;
    ValueError (one line naming it) for anything else."""
    pointer = Path(save_dir) / TRACKER
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    if text == "release":
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"{pointer} holds {text!r}, not an iteration number")


def remove_incomplete(save_dir: Path) -> list[Path]:
    """Delete `iter_*` folders past the latest pointer that never got a manifest (saves that died midway, since the
    pointer moves only after the manifest is written); return what was removed. Checkpoints up to the pointer,
    including ones written before manifests existed, are never touched."""
    try:
        latest = read_tracker(save_dir)
    except ValueError:  # a garbled pointer vouches for no iteration
        latest = None
    latest = latest if isinstance(latest, int) else -1
    removed = []
    for path in sorted(Path(save_dir).glob("iter_*")):
        number = path.name[len("iter_"):]
        if path.is_dir() and number.isdigit() and int(number) > latest and not has_manifest(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class SaveFolderLock:
    """An exclusive lock on a --save folder for the lifetime of one run (released by the kernel on any exit)."""

    def __init__(self, save_dir: str | os.PathLike):
        self.path = Path(save_dir) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ValueError(f"--save {save_dir} is in use by another run ({holder}); give this run its own --save "
                             "folder, or wait for that run to end") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()
