#!/bin/bash
# DPO of the SFT 92m: `sbatch examples/dpo_92m.sh` from the repository root (after sft_92m.sh). The policy and the
# frozen reference both start from WORK_DIR/checkpoints/sft; saves WORK_DIR/checkpoints/dpo. Time limit, requeue,
# MODEL_SIZE, EXTRA_ARGS, GPUS_PER_NODE on CPU nodes: as in pretrain_92m_multinode.sh. DRY_RUN=1 prints it.
#SBATCH --job-name=tinyllm-92m-dpo
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}/examples/common.sh"

TP="${TP:-1}"
PP="${PP:-1}"
MICRO_BATCH="${MICRO_BATCH:-8}"          # pairs: each is a chosen and a rejected sequence
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
SEQ_LENGTH="${SEQ_LENGTH:-1024}"
TRAIN_ITERS="${TRAIN_ITERS:-1000}"
LR="${LR:-5e-7}"
MIN_LR="${MIN_LR:-5e-8}"
BETA="${BETA:-0.1}"                      # the seed's DPO temperature
PREFERENCE_DATA="${PREFERENCE_DATA:-$DATA_DIR/dpo_preference_document}"
LOAD="${LOAD:-$CKPT_DIR/sft}"
SAVE="${SAVE:-$CKPT_DIR/dpo}"
SAVE_INTERVAL="${SAVE_INTERVAL:-200}"
EVAL_INTERVAL="${EVAL_INTERVAL:-200}"
EVAL_ITERS="${EVAL_ITERS:-10}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"
RUN_DIR="${RUN_DIR:-$RUNS_DIR/dpo}"

check_layout "$TP" "$PP" "$MICRO_BATCH" "$GLOBAL_BATCH"
read -r -a PREFERENCE_PREFIXES <<< "$PREFERENCE_DATA"
# The reference is always the SFT model, also when the policy resumes from its own save.
load_args "$SAVE" --load "$LOAD" --finetune

distributed tinyllm_mcore.stages.dpo \
  --model-size "$MODEL_SIZE" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --bf16 \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LENGTH" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction 0.1 \
  --beta "$BETA" --ref-load "$LOAD" \
  --tokenizer-model "$TOKENIZER" --preference-data "${PREFERENCE_PREFIXES[@]}" --split 98,2,0 \
  ${LOAD_ARGS[@]+"${LOAD_ARGS[@]}"} --save "$SAVE" --save-interval "$SAVE_INTERVAL" \
  --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval "$LOG_INTERVAL" \
  --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-jsonl "$RUN_DIR/metrics.jsonl" \
  --exit-signal-handler ${EXTRA[@]+"${EXTRA[@]}"}
