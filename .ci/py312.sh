#!/usr/bin/env bash
# CI, second leg: Python 3.12 with the newest megatron-core setup.py allows (0.19.x), the other end of the supported
# range (the first leg, .ci/run, tests Python 3.11 + megatron-core 0.16.1). Builds a fresh virtual environment, runs
# the README's test command in it, and the cross-version checkpoint test against the first leg's interpreter.
#
# Environment (all optional):
#   PYTHON312            the Python 3.12 interpreter (default: python3.12 on PATH, else pyenv's newest 3.12)
#   PY312_VENV           where to build the environment (default: $TMPDIR/tinyllm-py312; rebuilt every run)
#   TINYLLM_WHEELHOUSE   kept between runs: PyPI's torch for 3.12 is the CUDA build (~4.7 GB with its nvidia-*
#                        wheels; it runs on CPU), downloaded once into this folder and installed from it afterwards
#                        (default: ~/.cache/tinyllm-py312-wheels)
#   TINYLLM_OTHER_PYTHON the first leg's interpreter, for the cross-version checkpoint test (default: `python` on PATH
#                        when it has megatron-core installed)
#   PY312_PYTEST_ARGS    what pytest runs (default: the whole suite, as the README's command)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

is_312() { [[ -n "$1" ]] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }
if [[ -z "${PYTHON312:-}" ]]; then  # python3.12 on PATH may be a pyenv shim for a version not selected: try it
    for candidate in "$(command -v python3.12 || true)" \
                     $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python 2>/dev/null | sort -rV); do
        if is_312 "$candidate"; then PYTHON312=$candidate; break; fi
    done
fi
if ! is_312 "${PYTHON312:-}"; then
    echo "error: no Python 3.12 found (set PYTHON312)" >&2
    exit 2
fi
VENV=${PY312_VENV:-${TMPDIR:-/tmp}/tinyllm-py312}
WHEELHOUSE=${TINYLLM_WHEELHOUSE:-$HOME/.cache/tinyllm-py312-wheels}
TORCH=torch==2.13.0

rm -rf "$VENV"
"$PYTHON312" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --quiet)

mkdir -p "$WHEELHOUSE"
if ! ls "$WHEELHOUSE"/torch-2.13.0-cp312-*.whl >/dev/null 2>&1; then
    echo "[py312] downloading $TORCH for Python 3.12 into $WHEELHOUSE (once; ~4.7 GB)"
    "${pip[@]}" download --only-binary=:all: --dest "$WHEELHOUSE" "$TORCH"
fi
"${pip[@]}" install --find-links "$WHEELHOUSE" "$TORCH"
"${pip[@]}" install -e ".[dev,eval]"
"$VENV/bin/python" -c 'import importlib.metadata as m, sys; print(f"[py312] Python {sys.version.split()[0]}, torch",
    m.version("torch"), "megatron-core", m.version("megatron-core"), "transformers", m.version("transformers"))'
echo "[py312] environment ready in $((SECONDS - start)) s"

if [[ -z "${TINYLLM_OTHER_PYTHON:-}" ]] && command -v python >/dev/null &&
   python -c 'import importlib.metadata as m; m.version("megatron-core")' 2>/dev/null; then
    TINYLLM_OTHER_PYTHON=$(command -v python)
fi
export TINYLLM_OTHER_PYTHON=${TINYLLM_OTHER_PYTHON:-}

# The README's test command in the 3.12 environment (with TINYLLM_OTHER_PYTHON, including the cross-version test).
eval "set -- ${PY312_PYTEST_ARGS:-}"  # shell words, so a quoted -m expression stays one argument
"$VENV/bin/python" -m pytest -q "$@"
echo "[py312] done in $((SECONDS - start)) s"
