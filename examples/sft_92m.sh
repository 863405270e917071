#!/bin/bash
# SFT of the pretrained 92m: `sbatch examples/sft_92m.sh` from the repository root (after pretrain_92m_multinode.sh).
# Loads WORK_DIR/checkpoints/pretrain with --finetune (weights only: fresh optimizer and schedule, the seed's 3% warmup)
# and saves WORK_DIR/checkpoints/sft; a re-submitted or requeued job resumes from its own save (the time-limit signal
# saves first, as in pretrain_92m_multinode.sh). MODEL_SIZE, EXTRA_ARGS, GPUS_PER_NODE on CPU nodes: as there.
# DRY_RUN=1 prints the command.
#SBATCH --job-name=tinyllm-92m-sft
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --exclusive
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

source "${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}/examples/common.sh"

TP="${TP:-1}"
PP="${PP:-1}"
MICRO_BATCH="${MICRO_BATCH:-16}"
GLOBAL_BATCH="${GLOBAL_BATCH:-256}"
SEQ_LENGTH="${SEQ_LENGTH:-1024}"
TRAIN_ITERS="${TRAIN_ITERS:-3000}"
LR="${LR:-1e-4}"
MIN_LR="${MIN_LR:-1e-5}"
# chat jsonl ({question, answer} or {messages}) or prefixes from preprocess_corpus.sh (--mode sft)
SFT_DATA="${SFT_DATA:-$DATA_DIR/sft_sft_document}"
LOAD="${LOAD:-$CKPT_DIR/pretrain}"
SAVE="${SAVE:-$CKPT_DIR/sft}"
SAVE_INTERVAL="${SAVE_INTERVAL:-500}"
EVAL_INTERVAL="${EVAL_INTERVAL:-500}"
EVAL_ITERS="${EVAL_ITERS:-10}"
LOG_INTERVAL="${LOG_INTERVAL:-10}"
RUN_DIR="${RUN_DIR:-$RUNS_DIR/sft}"

check_layout "$TP" "$PP" "$MICRO_BATCH" "$GLOBAL_BATCH"
read -r -a SFT_PREFIXES <<< "$SFT_DATA"
load_args "$SAVE" --load "$LOAD" --finetune

distributed tinyllm_mcore.stages.sft \
  --model-size "$MODEL_SIZE" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --use-distributed-optimizer --bf16 \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LENGTH" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-fraction 0.03 \
  --tokenizer-model "$TOKENIZER" --sft-data "${SFT_PREFIXES[@]}" --split 98,2,0 \
  ${LOAD_ARGS[@]+"${LOAD_ARGS[@]}"} --save "$SAVE" --save-interval "$SAVE_INTERVAL" \
  --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS" --log-interval "$LOG_INTERVAL" \
  --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-jsonl "$RUN_DIR/metrics.jsonl" \
  --exit-signal-handler ${EXTRA[@]+"${EXTRA[@]}"}
