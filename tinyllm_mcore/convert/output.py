"""How the converters write: an output directory appears whole or not at all, and one progress printer."""
from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from tinyllm_mcore.convert.mapping import MappingError
from tinyllm_mcore.runtime.files import new_dir_beside, publish_dir


def add_conversion_flags(parser, verb: str) -> None:
    """The flags both converters share: refusing non-finite tensors, and how much they print."""
    parser.add_argument("--allow-non-finite", action="store_true",
                        help=f"{verb} even if tensors hold NaN/inf (refused by default, naming the tensor)")
    parser.add_argument("--quiet", action="store_true", help="do not list every mapped tensor")


def conversion_log(quiet: bool):
    """The converters' printer: every mapped tensor (lines indented by two spaces) unless quiet, always the rest."""
    def log(msg: str) -> None:
        if not (quiet and msg.startswith("  ")):
            print(msg, flush=True)

    return log


def _is_out_of_space(error: BaseException, directory) -> bool:
    # megatron's checkpoint writer reports a full disk as "unexpected pos N vs M", without the errno: look at the disk
    usage = shutil.disk_usage(directory)
    if usage.free < min(1 << 20, usage.total // 20):
        return True
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):  # safetensors' Rust errors
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def staged_output_dir(target, replaceable=lambda existing: True):
    """Yield an empty temporary directory beside ``target``; it becomes ``target`` only when the block succeeds.

    On any failure (bad input, disk full, a signal) the temporary is removed and ``target`` is left as it was, so a
    failed conversion leaves no empty or partial output. An existing non-empty ``target`` is replaced whole, only if
    ``replaceable(target)`` says it is an earlier output of the same kind (never someone's unrelated folder).
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not replaceable(target):
        raise ValueError(f"output {target} is a non-empty directory that is not an earlier output; "
                         "choose a new or empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = new_dir_beside(target)  # not mkdtemp: its 0700 mode would become the output's
    try:
        yield staged
        publish_dir(staged, target)
    except BaseException as e:
        out_of_space = _is_out_of_space(e, staged)
        shutil.rmtree(staged, ignore_errors=True)
        if out_of_space:
            raise MappingError(f"no space left on device while writing {target} (nothing was written; free space "
                               f"on {target.parent} and retry)") from None
        raise
