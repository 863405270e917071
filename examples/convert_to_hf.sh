#!/bin/bash
# Export the final (DPO) checkpoint to a Hugging Face model folder: `sbatch examples/convert_to_hf.sh` (or run it on
# any machine: outside Slurm it runs directly). Any TP/PP layout converts; weights are written as safetensors.
# LOAD=WORK_DIR/checkpoints/sft exports the SFT model instead; EXTRA_ARGS adds flags. DRY_RUN=1 prints the command.
# The architecture follows the model (llama for dense, qwen2_moe for MoE); HF_ARCH=... names it explicitly.
#SBATCH --job-name=tinyllm-convert-hf
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --output=%x-%j.out

source "${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}/examples/common.sh"

LOAD="${LOAD:-$CKPT_DIR/dpo}"
DTYPE="${DTYPE:-bf16}"

single -m tinyllm_mcore.cli.mcore_to_hf \
  --load "$LOAD" --save "$HF_DIR" --tokenizer-model "$TOKENIZER" --dtype "$DTYPE" ${HF_ARCH:+--hf-arch "$HF_ARCH"} --quiet \
  ${EXTRA[@]+"${EXTRA[@]}"}
