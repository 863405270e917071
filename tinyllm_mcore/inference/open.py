"""The one way to open a checkpoint for inference (generate, chat, evaluate, the quickstart's QA and reward scoring).

`open_checkpoint` resolves `--load` once and reads the checkpoint's common state once, then, in this order:
1. checks the tokenizer against the one the checkpoint was trained with (size and identity;
   `checkpoint.io.check_tokenizer`, the same check as training's `--load`) — before any process-group work, so a
   wrong `--tokenizer-model` fails fast;
2. checks the parallel layout against the model and starts the runtime if needed (TP x PP on the launcher's ranks);
3. checks the files against the manifest (rank 0; every rank fails alike);
4. builds this rank's chunks for the saved preset and head (LM or reward) and loads the weights (any saved layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinyllm_mcore.checkpoint import adapters
from tinyllm_mcore.checkpoint import io as ckpt
from tinyllm_mcore.checkpoint.metadata import CheckpointMetadata


@dataclass
class OpenedCheckpoint:
    path: Path  # the iter_* directory --load resolved to
    preset: object  # the ModelPreset the checkpoint was trained with
    metadata: CheckpointMetadata  # the run that wrote it
    chunks: list  # this rank's model chunks, eval mode, unwrapped

    @property
    def model(self):
        """The only chunk (no pipeline parallelism)."""
        if len(self.chunks) != 1:
            raise ValueError(f"{self.path} is open as {len(self.chunks)} pipeline chunks here, not one model")
        return self.chunks[0]


def open_checkpoint(load: str, tokenizer=None, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                    bf16: bool = False, use_te: bool | None = None, allow_tokenizer_change: bool = False,
                    verify: bool = True, require_manifest: bool = False) -> OpenedCheckpoint:
    """Open `load` for inference at TP x PP (run under torchrun / srun for more than one rank)."""
    from megatron.core import parallel_state as ps

    from tinyllm_mcore.runtime import distributed as rt

    saved = ckpt.read_checkpoint(ckpt.resolve_load_dir(load), verify=False)  # verified at step 3
    preset = saved.preset
    if tokenizer is not None:
        ckpt.check_tokenizer(saved, tokenizer.vocab_size, getattr(tokenizer, "identity", None),
                             allow_change=allow_tokenizer_change)
    if not ps.model_parallel_is_initialized():
        launch = rt.launch_from_env()
        rt.check_parallel_layout(launch.world_size, tensor_parallel_size, pipeline_parallel_size,
                                 preset.num_attention_heads, preset.num_layers,
                                 num_query_groups=preset.num_query_groups)
        rt.initialize(tp=tensor_parallel_size, pp=pipeline_parallel_size)
    if verify:
        ckpt.verify_checkpoint(saved.path, require_manifest=require_manifest)
    if adapters.is_lora_checkpoint(saved):  # adapters only: the base they were trained on, then them
        base = adapters.open_base(saved, verify=verify, require_manifest=require_manifest)
        chunks = build_inference_chunks(preset, saved.metadata, bf16=bf16, use_te=False,
                                        lora=adapters.settings_of(saved))
        adapters.load(saved, base, chunks, finetune=True)
    else:
        chunks = build_inference_chunks(preset, saved.metadata, bf16=bf16, use_te=use_te)
        ckpt.load_checkpoint(saved, chunks, finetune=True)
    for chunk in chunks:
        chunk.eval()
    return OpenedCheckpoint(path=saved.path, preset=preset, metadata=saved.metadata, chunks=chunks)


def build_inference_chunks(preset, saved: CheckpointMetadata, *, bf16: bool = False,
                           use_te: bool | None = None, lora=None) -> list:
    """This rank's chunks of the saved preset and head at the current parallel layout, weights not loaded (and not
    initialised: the checkpoint's overwrite them); bare modules, so bf16 logits stay bf16. `lora`: a LoRA
    checkpoint's adapter settings (model.lora.LoraSettings)."""
    from megatron.core import parallel_state as ps

    from tinyllm_mcore.model.build import build_chunks, transformer_config

    config = transformer_config(
        preset, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(), bf16=bf16,
        use_cpu_initialization=not torch.cuda.is_available(), perform_initialization=False)
    return build_chunks(preset, config, head=saved.model_head, use_te=use_te,
                        make_vocab_size_divisible_by=saved.make_vocab_size_divisible_by,
                        half_precision_wrapper=False, lora=lora)
