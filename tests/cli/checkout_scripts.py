"""Running a command the way users do: `python tools/NAME.py` (a checkout script) or `tinyllm-NAME` (a console script),
from a directory other than the checkout, so that it imports the installed package."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tool_command(name: str, *args) -> list[str]:
    return [sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)]


def console_script(name: str) -> Path:
    """The installed `name` script beside this interpreter (`pip install -e .` writes it)."""
    path = Path(sysconfig.get_path("scripts")) / name
    assert path.is_file(), f"{path} is missing: run `pip install -e .` after changing setup.py"
    return path


def run(argv: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def the_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line a command prints for bad input (and it exited non-zero, without a traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (proc.returncode, proc.stderr)
    return lines[0]
