# Shared by the Slurm examples (sourced, not run). Every setting is an environment variable with a default, so
#   TP=2 PP=2 NNODES=4 sbatch --nodes=4 examples/pretrain_92m_multinode.sh
# overrides anything; MODEL_SIZE (default 92m) picks the preset and EXTRA_ARGS="--flag value ..." adds flags to every
# stage (last, so they override; e.g. "--save-hf", or "--load-hf DIR" to start from an HF folder, see load_args).
# DRY_RUN=1 prints the exact commands instead of running them (works outside Slurm too).
#
# Paths shared by all stages (pretrain's save = SFT's load, SFT's save = DPO's load, DPO's save = convert's load):
#   WORK_DIR/data         indexed datasets          (examples/preprocess_corpus.sh writes them)
#   WORK_DIR/tokenizer    tokenizer.model
#   WORK_DIR/checkpoints/{pretrain,sft,dpo}
#   WORK_DIR/runs/<stage> TensorBoard events, metrics.jsonl
#   WORK_DIR/hf           the Hugging Face export
#
# Every command is `python -m tinyllm_mcore.<module>`: the package must be installed where the jobs run
# (`pip install -e .` in a checkout every node sees); in a container (CONTAINER_IMAGE) the job starts in the mounted
# checkout, which `-m` imports from.
set -euo pipefail

# Under sbatch the script runs from a spool copy: find the repository from the submit directory.
REPO="${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
WORK_DIR="${WORK_DIR:-$REPO/work}"
DATA_DIR="${DATA_DIR:-$WORK_DIR/data}"
TOKENIZER="${TOKENIZER:-$WORK_DIR/tokenizer}"
CKPT_DIR="${CKPT_DIR:-$WORK_DIR/checkpoints}"
RUNS_DIR="${RUNS_DIR:-$WORK_DIR/runs}"
HF_DIR="${HF_DIR:-$WORK_DIR/hf}"
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"

# Cluster shape (defaults: the job's own allocation, else 1 node x 8 GPUs). GPUS_PER_NODE is the number of training
# processes per node: on CPU nodes `GPUS_PER_NODE=1 sbatch --gpus-per-node=0 --ntasks-per-node=1 ...` runs one each.
NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}"
# A port per job, so two jobs sharing a node do not collide (29500 outside Slurm, torchrun's default).
MASTER_PORT="${MASTER_PORT:-$([ -n "${SLURM_JOB_ID:-}" ] && echo $((20000 + SLURM_JOB_ID % 20000)) || echo 29500)}"
MODEL_SIZE="${MODEL_SIZE:-92m}"
# EXTRA_ARGS="--flag value ...": appended last to the stage's command, so it also overrides the script's own flags.
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

# Optional NGC / pyxis container: CONTAINER_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3 (the repo is mounted at itself).
CONTAINER_IMAGE="${CONTAINER_IMAGE:-}"
CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-$REPO:$REPO,$WORK_DIR:$WORK_DIR}"

# NCCL / CUDA settings megatron-core expects on multi-node GPU jobs.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"   # TP comm/compute ordering
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
[ -n "${NCCL_SOCKET_IFNAME:-}" ] && export NCCL_SOCKET_IFNAME
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}"

die() { echo "error: $*" >&2; exit 2; }

# run CMD...: print it (DRY_RUN=1) or run it, echoing it first either way.
run() {
  if [ "$DRY_RUN" = "1" ]; then
    printf '%q ' "$@"; printf '\n'
  else
    echo "+ $*" >&2
    "$@"
  fi
}

# master_addr: the address of the allocation's first node (localhost outside Slurm). Slurm's NodeAddr is what
# slurmctld itself uses to reach the node (it defaults to the node name), so it resolves where a bare node name may not
# (examples/local_slurm.sh's nodes n1 and n2 are both 127.0.0.1).
master_addr() {
  local first addr
  if [ -n "${MASTER_ADDR:-}" ]; then echo "$MASTER_ADDR"
  elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    addr="$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)" || true
    echo "${addr:-$first}"
  else echo localhost; fi
}

# check_layout TP PP MICRO GLOBAL: the world must split into TP x PP x DP and the global batch into micro-batches.
check_layout() {
  local tp=$1 pp=$2 micro=$3 global=$4 world=$((NNODES * GPUS_PER_NODE))
  [ $((world % (tp * pp))) -eq 0 ] || die "TP=$tp x PP=$pp does not divide the world size $world ($NNODES nodes x $GPUS_PER_NODE GPUs)"
  DP=$((world / (tp * pp)))
  [ $((global % (micro * DP))) -eq 0 ] || die "GLOBAL_BATCH=$global is not a multiple of MICRO_BATCH=$micro x DP=$DP"
  echo "# world $world = TP $tp x PP $pp x DP $DP; global batch $global = $micro x $DP x $((global / (micro * DP))) accumulation steps" >&2
}

# launcher ARGS...: srun (+ container flags) inside a Slurm job; nothing outside one (a local run).
launcher() {
  LAUNCHER=()
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    LAUNCHER=(srun "$@")
    if [ -n "$CONTAINER_IMAGE" ]; then
      LAUNCHER+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS" --container-workdir="$REPO")
    fi
  fi
}

# distributed MODULE ARGS...: the training launch.
# In a Slurm job, srun starts one task per process (NNODES x GPUS_PER_NODE), each a rank of its own (SLURM_PROCID,
# SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT passed here), as Megatron-LM does. That way a signal Slurm
# sends to the job's steps (#SBATCH --signal before the time limit, `scancel --signal=TERM`, a requeue) reaches the
# training processes themselves, which --exit-signal-handler turns into "save after this iteration, exit 0"; a torchrun
# agent in between would take SIGTERM as its own death signal and fail the step. Outside Slurm: torchrun.
distributed() {
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    launcher --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1
    run env MASTER_ADDR="$(master_addr)" MASTER_PORT="$MASTER_PORT" "${LAUNCHER[@]}" "$PYTHON" -m "$@"
  else
    run "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
      --rdzv-backend=c10d --rdzv-endpoint="$(master_addr):$MASTER_PORT" --rdzv-id=local -m "$@"
  fi
}

# single ARGS...: one task (preprocessing, conversion).
single() {
  launcher --nodes=1 --ntasks=1
  run ${LAUNCHER[@]+"${LAUNCHER[@]}"} "$PYTHON" "$@"
}

# load_args SAVE FALLBACK...: sets LOAD_ARGS to "--load SAVE" when SAVE already holds a checkpoint (resume after a
# requeue or time limit), else to FALLBACK (e.g. --load PREVIOUS_STAGE --finetune). A `--load-hf DIR` in EXTRA_ARGS
# is the start instead of FALLBACK, and gives way to the resume (the stages refuse --load-hf with --load): it is taken
# out of EXTRA either way.
load_args() {
  local save=$1; shift
  local i hf=() rest=()
  for ((i = 0; i < ${#EXTRA[@]}; i++)); do
    case "${EXTRA[i]}" in
      --load-hf) hf=(--load-hf "${EXTRA[i + 1]:-}"); i=$((i + 1)) ;;
      --load-hf=*) hf=(--load-hf "${EXTRA[i]#--load-hf=}") ;;
      *) rest+=("${EXTRA[i]}") ;;
    esac
  done
  EXTRA=(${rest[@]+"${rest[@]}"})
  if [ -f "$save/latest_checkpointed_iteration.txt" ]; then LOAD_ARGS=(--load "$save")
  elif [ ${#hf[@]} -gt 0 ]; then LOAD_ARGS=("${hf[@]}")
  else LOAD_ARGS=("$@"); fi
}
