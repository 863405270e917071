"""The megatron side of a conversion: one CPU process, the whole model.

The converters run as one ordinary process whatever the TP/PP of source or target: they build the *global* (TP1/PP1)
GPTModel with model.build, whose sharded_state_dict() names every tensor with its dist-checkpoint key and global
shape. Dist checkpoints are reshardable, so a global write loads at any TP/PP and a global read accepts any saved
layout. Checkpoints are read and written through checkpoint.io only.
"""
from __future__ import annotations

import contextlib

from tinyllm_mcore.model.presets import ModelPreset


@contextlib.contextmanager
def single_process_megatron():
    """megatron parallel state for a world of one (TP1/PP1, gloo); torn down afterwards if this set it up."""
    from megatron.core import parallel_state as ps

    from tinyllm_mcore.runtime import distributed as rt

    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1
                or ps.get_expert_model_parallel_world_size() != 1):
            raise RuntimeError("the converters need a process without a TP/PP/EP > 1 megatron state")
        yield
        return
    rt.initialize(1, 1)
    try:
        yield
    finally:
        rt.destroy()


def whole_model(preset: ModelPreset, padded_vocab: int, lora=None):
    """The whole LM (TP1, one pipeline stage, local spec) with uninitialised fp32 weights and ``padded_vocab`` rows,
    on the CPU; under single_process_megatron."""
    from tinyllm_mcore.model.build import build_chunks, transformer_config

    config = transformer_config(preset, use_cpu_initialization=True, perform_initialization=False)
    # padded_vocab_size(v, 1, padded) == padded: the rows the target (or source) TP layout uses
    (model,) = build_chunks(preset, config, use_te=False, make_vocab_size_divisible_by=padded_vocab, device="cpu",
                            lora=lora)  # a LoRA checkpoint's adapter settings (model.lora.LoraSettings)
    return model
