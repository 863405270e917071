#!/bin/bash
# The embedded default, end to end on CPU: `bash examples/quickstart.sh [--fast] [--output-dir DIR] [--corpus PATH]`.
# Same as `python -m tinyllm_mcore.quickstart`; see its --help for every setting.
set -euo pipefail
exec "${PYTHON:-python}" -m tinyllm_mcore.quickstart "$@"
