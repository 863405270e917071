# Sourced by .ci/run before pytest: a real two-node Slurm cluster on this machine for tests/examples/test_slurm_jobs.py
# and tests/runtime/test_launchers.py (examples/local_slurm.sh; installs slurm-wlm and munge from apt when missing,
# needs root). TINYLLM_REQUIRE_SLURM=1 turns those tests' skip into a failure, so CI runs them for real. The EXIT trap
# stops the cluster however CI ends, so no daemon outlives the run (it replaces any EXIT trap set before).
bash examples/local_slurm.sh stop >/dev/null 2>&1 || true   # a cluster left over from an interrupted run
trap 'bash examples/local_slurm.sh stop' EXIT
export SLURM_CONF="$(bash examples/local_slurm.sh start | sed -n 's/^export SLURM_CONF=//p')"
[ -n "$SLURM_CONF" ] || { echo "error: the local Slurm cluster did not start" >&2; exit 1; }
export TINYLLM_REQUIRE_SLURM=1
