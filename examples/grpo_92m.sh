#!/bin/bash
# GRPO of the SFT 92m with verifiable rewards: `sbatch examples/grpo_92m.sh` from the repository root (after
# sft_92m.sh). The policy starts from WORK_DIR/checkpoints/sft (KL_BETA > 0: the frozen reference too); saves
# WORK_DIR/checkpoints/grpo. Prompts: a reasoning-gym TASK (default chain_sum, TASK_CONFIG its JSON config), or
# PROMPTS=file.jsonl of {"prompt", "answer"} (ANSWER_SCORER exact | math-verify). GLOBAL_BATCH counts sequences
# (prompts x GROUP_SIZE) and must give every data-parallel rank whole groups. Time limit, requeue, MODEL_SIZE,
# EXTRA_ARGS, GPUS_PER_NODE on CPU nodes: as in pretrain_92m_multinode.sh. DRY_RUN=1 prints it.
#SBATCH --job-name=tinyllm-92m-grpo
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
GROUP_SIZE="${GROUP_SIZE:-8}"            # responses sampled per prompt
MICRO_BATCH="${MICRO_BATCH:-16}"         # sequences
GLOBAL_BATCH="${GLOBAL_BATCH:-512}"      # sequences per step: 64 prompts x 8
SEQ_LENGTH="${SEQ_LENGTH:-512}"          # prompt + response
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-256}"
TEMPERATURE="${TEMPERATURE:-1.0}"
TRAIN_ITERS="${TRAIN_ITERS:-500}"
LR="${LR:-1e-6}"
MIN_LR="${MIN_LR:-1e-6}"
CLIP_EPS="${CLIP_EPS:-0.2}"
KL_BETA="${KL_BETA:-0.001}"
TASK="${TASK:-chain_sum}"
TASK_CONFIG="${TASK_CONFIG:-}"
PROMPTS="${PROMPTS:-}"
ANSWER_SCORER="${ANSWER_SCORER:-exact}"
HELDOUT_SIZE="${HELDOUT_SIZE:-}"          # default: 200 of a task, 0 of a prompts file
LOAD="${LOAD:-$CKPT_DIR/sft}"
SAVE="${SAVE:-$CKPT_DIR/grpo}"
SAVE_INTERVAL="${SAVE_INTERVAL:-50}"
EVAL_INTERVAL="${EVAL_INTERVAL:-50}"
LOG_INTERVAL="${LOG_INTERVAL:-1}"
RUN_DIR="${RUN_DIR:-$RUNS_DIR/grpo}"

check_layout "$TP" "$PP" "$MICRO_BATCH" "$GLOBAL_BATCH"
[ $((GLOBAL_BATCH % (GROUP_SIZE * DP))) -eq 0 ] || die "GLOBAL_BATCH=$GLOBAL_BATCH must be a multiple of GROUP_SIZE=$GROUP_SIZE x DP=$DP (whole groups on every data-parallel rank)"
if [ -n "$PROMPTS" ]; then
  SOURCE_ARGS=(--prompts "$PROMPTS" --answer-scorer "$ANSWER_SCORER")
else
  SOURCE_ARGS=(--task "$TASK")
  [ -n "$TASK_CONFIG" ] && SOURCE_ARGS+=(--task-config "$TASK_CONFIG")
fi
[ -n "$HELDOUT_SIZE" ] && SOURCE_ARGS+=(--heldout-size "$HELDOUT_SIZE")
# The reference is always the SFT model, also when the policy resumes from its own save.
load_args "$SAVE" --load "$LOAD" --finetune
REF_ARGS=()
[ "$KL_BETA" != "0" ] && REF_ARGS=(--ref-load "$LOAD")

distributed tinyllm_mcore.stages.grpo \
  --model-size "$MODEL_SIZE" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --bf16 \
  --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --seq-length "$SEQ_LENGTH" \
  --train-iters "$TRAIN_ITERS" --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style constant \
  "${SOURCE_ARGS[@]}" \
  --group-size "$GROUP_SIZE" --max-new-tokens "$MAX_NEW_TOKENS" --temperature "$TEMPERATURE" \
  --clip-eps "$CLIP_EPS" --kl-beta "$KL_BETA" ${REF_ARGS[@]+"${REF_ARGS[@]}"} \
  --tokenizer-model "$TOKENIZER" \
  ${LOAD_ARGS[@]+"${LOAD_ARGS[@]}"} --save "$SAVE" --save-interval "$SAVE_INTERVAL" \
  --eval-interval "$EVAL_INTERVAL" --log-interval "$LOG_INTERVAL" \
  --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-jsonl "$RUN_DIR/metrics.jsonl" \
  --exit-signal-handler ${EXTRA[@]+"${EXTRA[@]}"}
