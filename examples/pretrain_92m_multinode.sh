#!/bin/bash
# Pretrain the 92m preset on several 8-GPU nodes: `sbatch examples/pretrain_92m_multinode.sh` from the repository root.
# Every setting below is an environment variable (NNODES=4 TP=2 sbatch --nodes=4 ...); DRY_RUN=1 prints the command;
# MODEL_SIZE picks another preset, EXTRA_ARGS="--flag value" adds (or overrides) flags.
# Time limits and preemption: Slurm sends SIGTERM 2 minutes before the limit (--signal), every rank saves after the
# current iteration and the job exits 0 (--exit-signal-handler); re-submitting the same job, or a requeue
# (`scontrol requeue`, --requeue), resumes from WORK_DIR/checkpoints/pretrain (the loop restores the optimizer, LR
# schedule, RNG and the consumed-samples counter, so the data order continues exactly).
# CPU nodes (e.g. examples/local_slurm.sh): GPUS_PER_NODE=1 sbatch --gpus-per-node=0 --ntasks-per-node=1 --cpus-per-task=1
#SBATCH --job-name=tinyllm-92m-pretrain
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}/examples/common.sh"

# 92m: 8 layers, hidden 512, 8 heads. It fits one GPU, so pure data parallelism (TP=1 PP=1) is fastest; TP must
# divide the 8 heads and stay inside a node, PP must divide the 8 layers.
TP="${TP:-1}"
PP="${PP:-1}"
MICRO_BATCH="${MICRO_BATCH:-32}"
GLOBAL_BATCH="${GLOBAL_BATCH:-1024}"      # 1M tokens per step at seq 1024
SEQ_LENGTH="${SEQ_LENGTH:-1024}"
TRAIN_ITERS="${TRAIN_ITERS:-20000}"
LR="${LR:-3e-4}"
MIN_LR="${MIN_LR:-3e-5}"
SAVE_INTERVAL="${SAVE_INTERVAL:-1000}"
EVAL_INTERVAL="${EVAL_INTERVAL:-1000}"
EVAL_ITERS="${EVAL_ITERS:-20}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"
# A blend of preprocessed corpora, megatron style: "weight prefix weight prefix ..." (examples/preprocess_corpus.sh).
DATA_PATH="${DATA_PATH:-0.5 $DATA_DIR/wiki_text_document 0.3 $DATA_DIR/baike_text_document 0.2 $DATA_DIR/skypile_text_document}"
SAVE="${SAVE:-$CKPT_DIR/pretrain}"
RUN_DIR="${RUN_DIR:-$RUNS_DIR/pretrain}"

check_layout "$TP" "$PP" "$MICRO_BATCH" "$GLOBAL_BATCH"
read -r -a DATA_BLEND <<< "$DATA_PATH"
load_args "$SAVE"   # resume when SAVE already has a checkpoint; a fresh run starts from random weights
mkdir -p "$RUN_DIR" 2>/dev/null || true

distributed tinyllm_mcore.stages.pretrain \
  --model-size "$MODEL_SIZE" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --use-distributed-optimizer --bf16 \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LENGTH" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction 0.05 \
  --weight-decay 0.01 --clip-grad 1.0 \
  --tokenizer-model "$TOKENIZER" --data-path "${DATA_BLEND[@]}" --split 990,9,1 \
  --data-cache-path "$WORK_DIR/cache" \
  --save "$SAVE" --save-interval "$SAVE_INTERVAL" ${LOAD_ARGS[@]+"${LOAD_ARGS[@]}"} \
  --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval "$LOG_INTERVAL" \
  --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-jsonl "$RUN_DIR/metrics.jsonl" \
  --exit-signal-handler ${EXTRA[@]+"${EXTRA[@]}"}
