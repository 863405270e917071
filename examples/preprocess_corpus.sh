#!/bin/bash
# Train the tokenizer and turn raw corpora into megatron indexed datasets for the 92m examples:
# `sbatch examples/preprocess_corpus.sh` (CPU job; outside Slurm it runs directly). DRY_RUN=1 prints the commands.
#   CORPORA="name=path ..."  pretraining corpora (jsonl / jsonl.gz / parquet files, folders or globs), one output each:
#                            DATA_DIR/<name>_text_document, blended by pretrain_92m_multinode.sh's DATA_PATH
#   SFT_INPUT, DPO_INPUT     chat and preference jsonl -> DATA_DIR/sft_sft_document, DATA_DIR/dpo_preference_document
#   TRAIN_TOKENIZER=0        keep an existing TOKENIZER (e.g. the seed's ChatGLM3 tokenizer.model) instead
#   EXTRA_ARGS               more flags for every tinyllm_mcore.cli.preprocess_data call
#SBATCH --job-name=tinyllm-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=08:00:00
#SBATCH --output=%x-%j.out

source "${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}/examples/common.sh"

RAW_DIR="${RAW_DIR:-$WORK_DIR/raw}"
CORPORA="${CORPORA:-wiki=$RAW_DIR/wiki baike=$RAW_DIR/baike skypile=$RAW_DIR/skypile}"
SFT_INPUT="${SFT_INPUT:-$RAW_DIR/sft}"
DPO_INPUT="${DPO_INPUT:-$RAW_DIR/dpo}"
TRAIN_TOKENIZER="${TRAIN_TOKENIZER:-1}"
VOCAB_SIZE="${VOCAB_SIZE:-20000}"          # the seed's own SentencePiece size
WORKERS="${WORKERS:-${SLURM_CPUS_PER_TASK:-8}}"

read -r -a CORPUS_LIST <<< "$CORPORA"
for item in "${CORPUS_LIST[@]}"; do
  [[ "$item" == *=* ]] || die "CORPORA entries are name=path, got '$item'"
done

if [ "$TRAIN_TOKENIZER" = "1" ]; then
  inputs=()
  for item in "${CORPUS_LIST[@]}"; do inputs+=("${item#*=}"); done
  single -m tinyllm_mcore.cli.train_tokenizer --input "${inputs[@]}" --output-dir "$TOKENIZER" \
    --vocab-size "$VOCAB_SIZE" --num-threads "$WORKERS"
fi

for item in "${CORPUS_LIST[@]}"; do
  single -m tinyllm_mcore.cli.preprocess_data --mode pretrain --input "${item#*=}" \
    --output-prefix "$DATA_DIR/${item%%=*}" --tokenizer-model "$TOKENIZER" --json-keys text --append-eod \
    --workers "$WORKERS" ${EXTRA[@]+"${EXTRA[@]}"}
done
single -m tinyllm_mcore.cli.preprocess_data --mode sft --input "$SFT_INPUT" --output-prefix "$DATA_DIR/sft" \
  --tokenizer-model "$TOKENIZER" --workers "$WORKERS" ${EXTRA[@]+"${EXTRA[@]}"}
single -m tinyllm_mcore.cli.preprocess_data --mode preference --input "$DPO_INPUT" --output-prefix "$DATA_DIR/dpo" \
  --tokenizer-model "$TOKENIZER" --workers "$WORKERS" ${EXTRA[@]+"${EXTRA[@]}"}
