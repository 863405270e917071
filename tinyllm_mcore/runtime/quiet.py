"""A quiet terminal: what libraries warn about themselves is held back; `--verbose` shows it.

Every command imports this package first, so `install()` (called by tinyllm_mcore/__init__.py) is in place before
megatron, transformers or torch's submodules are imported. From then on:
- a `warnings.warn` whose location - the frame the library chose with `stacklevel` - is in a module of LIBRARIES is
  held. A library warning that points at our code, our own warnings and anything Python's filters already decide
  (`-W error`, `-W ignore`, DeprecationWarning's default) are untouched;
- a log record below ERROR from a LIBRARIES logger is held where it would reach the terminal: logging's last-resort
  handler (megatron, datasets, swanlab log without a handler of their own), the handlers torch, transformers,
  huggingface_hub and mlflow install for themselves (covered when they exist: at install, when a command builds its
  parser, after a tracker is imported), and the torch loggers that write while megatron is imported (by name).
Errors, tracebacks and our own `error:` / `warning:` lines are never held. `--verbose` (`add_verbose_flag`) prints
what was held, in order, and lets everything through from then on; without it nothing held is ever printed (at most
MAX_HELD items are kept). The choice is exported as TINYLLM_VERBOSE=1, so child processes (the quickstart's steps,
data workers, ranks started by a launcher from this process) follow it from their first import.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

# Top-level packages whose own warnings are noise for our users: they describe the library's configuration (no
# Transformer Engine, no apex), its deprecations, or its internals, and only the library can act on them.
LIBRARIES = frozenset({
    "megatron", "transformer_engine", "apex", "torch", "transformers", "tokenizers", "huggingface_hub", "datasets",
    "accelerate", "tensorboard", "lm_eval", "sentencepiece", "wandb", "mlflow", "swanlab", "alembic", "sqlalchemy",
    "pydantic", "google",  # google: protobuf
})
# torch sets up its handler when it is imported (after us, mostly): these of its loggers write while megatron imports
# (PyPI's CUDA torch on a CPU machine: "No CUDA runtime is found"), so they are held by name.
TORCH_IMPORT_LOGGERS = ("torch.utils.cpp_extension",)
ENV = "TINYLLM_VERBOSE"
MAX_HELD = 500


class _State:
    installed = False
    verbose = False
    held: list = []  # ("warning", args) | ("record", handler, record), in arrival order
    dropped = 0
    show_warning = None  # the showwarning we replaced


def _package(name: str) -> str:
    return name.partition(".")[0]


def _hold(item) -> None:
    if len(_State.held) < MAX_HELD:
        _State.held.append(item)
    else:
        _State.dropped += 1


def _warning_module(filename: str) -> str:
    """The module a warning is located in: the nearest frame on the stack running that file (warn's stacklevel
    picked it), as Python's own filters see it (`module=` matches the frame's __name__)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == filename:
            return frame.f_globals.get("__name__", "")
        frame = frame.f_back
    return ""


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if not _State.verbose and _package(_warning_module(filename)) in LIBRARIES:
        _hold(("warning", (message, category, filename, lineno, file, line)))
        return
    _State.show_warning(message, category, filename, lineno, file, line)


class _HoldLibraryRecords(logging.Filter):
    """On one handler (or logger): a library's records below ERROR wait for the --verbose decision."""

    def __init__(self, handler: logging.Handler | None):
        super().__init__()
        self.handler = handler  # None on a logger: the record is replayed through that logger's handlers

    def filter(self, record: logging.LogRecord) -> bool:
        if _State.verbose or record.levelno >= logging.ERROR or _package(record.name) not in LIBRARIES:
            return True
        _hold(("record", self.handler, record))
        return False


def _cover(target) -> None:
    if not any(isinstance(f, _HoldLibraryRecords) for f in target.filters):
        target.addFilter(_HoldLibraryRecords(target if isinstance(target, logging.Handler) else None))


def cover_library_handlers() -> None:
    """Hold library records on the handlers libraries have installed for themselves so far. Idempotent."""
    for name in LIBRARIES:
        for handler in logging.getLogger(name).handlers:
            _cover(handler)


def install() -> None:
    """Hold library warnings and log records from now on (verbose from the start under TINYLLM_VERBOSE=1)."""
    if _State.installed:
        return
    _State.installed = True
    _State.verbose = os.environ.get(ENV) == "1"
    _State.show_warning = warnings.showwarning
    warnings.showwarning = _show_warning
    if logging.lastResort is not None:
        _cover(logging.lastResort)
    for name in TORCH_IMPORT_LOGGERS:
        _cover(logging.getLogger(name))
    cover_library_handlers()


def set_verbose() -> None:
    """Show what was held, in order, and everything from now on (also in child processes)."""
    if _State.verbose:
        return
    _State.verbose = True
    os.environ[ENV] = "1"
    held, _State.held = _State.held, []
    for item in held:
        if item[0] == "warning":
            _State.show_warning(*item[1])
        elif item[1] is not None:
            item[1].handle(item[2])
        else:
            logging.getLogger(item[2].name).callHandlers(item[2])
    if _State.dropped:
        print(f"({_State.dropped} more library warnings were not kept)", file=sys.stderr, flush=True)
        _State.dropped = 0


def is_verbose() -> bool:
    return _State.verbose


class _VerboseAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        set_verbose()


def add_verbose_flag(parser) -> None:
    """Every command's `--verbose`: the libraries' warnings too (megatron's, torch's, ...). Called while the parser is
    built, after the command's modules (and the libraries they import) are loaded: covers their log handlers."""
    cover_library_handlers()
    parser.add_argument("--verbose", action=_VerboseAction,
                        help="also show the libraries' own warnings (megatron, torch, transformers, ...), which are "
                             "hidden by default")
