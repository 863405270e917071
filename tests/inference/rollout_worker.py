"""Runs in every rank for tests/inference/test_rollout.py, through tests.harness.distributed.run_ranks: the tiny
preset's random weights saved once (TP1), then the same rollouts at each layout, on the policy as training holds it
(megatron DDP, train mode)."""
from __future__ import annotations

from dataclasses import replace

import torch

from tinyllm_mcore.inference.generate import SamplingParams
from tinyllm_mcore.inference.rollout import sample_rollouts

# ragged prompts (the last at the model's context minus 3, so its rows get 3 tokens), G rows each
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 30, 40, 50, 60, 70, 80, 90, 100]]
CONTEXT = 64  # the preset's positions for these tests (a long prompt reaches the end quickly)
LONG_PROMPT = [3 + i % 500 for i in range(CONTEXT - 3)]
GROUP = 3
NEW_TOKENS = 12
VOCAB = 1000  # the tokenizer's vocabulary: the embedding's 24 TP padding rows must never be sampled
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=200)


def preset_for(num_layers: int):
    from tinyllm_mcore.model.presets import get_preset

    return replace(get_preset("tiny"), num_layers=num_layers, max_position_embeddings=CONTEXT, vocab_size=VOCAB)


def save_reference(save: str, num_layers: int) -> dict:
    """TP1 (a DP2 world): random weights (seeded, init std 0.2 so that greedy choices are clear of float noise),
    saved to `save`, and the reference rollouts."""
    from tinyllm_mcore.checkpoint.io import save_checkpoint
    from tinyllm_mcore.checkpoint.metadata import CheckpointMetadata
    from tinyllm_mcore.model.build import build_chunks, transformer_config
    from tinyllm_mcore.runtime import distributed as rt

    rt.initialize()
    preset = preset_for(num_layers)
    torch.manual_seed(0)
    chunks = build_chunks(preset, transformer_config(preset, use_cpu_initialization=True, init_method_std=0.2))
    save_checkpoint(save, 0, chunks, None, None, consumed_samples=0,
                    metadata=CheckpointMetadata(preset=preset, stage="pretrain", tensor_model_parallel_size=1,
                                                pipeline_model_parallel_size=1))
    return rollouts_at(save, tp=1, pp=1)


def rollouts_at(load: str, tp: int = 1, pp: int = 1, sequence_parallel: bool = False) -> dict:
    """The checkpoint's policy at TP x PP as the training loop holds it (megatron DDP, train mode): every check's
    rollouts."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from tinyllm_mcore.checkpoint import io as ckpt
    from tinyllm_mcore.model.build import build_chunks, transformer_config
    from tinyllm_mcore.runtime import distributed as rt

    saved = ckpt.read_checkpoint(ckpt.resolve_load_dir(load))
    rt.initialize(tp=tp, pp=pp)
    config = transformer_config(saved.preset, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                sequence_parallel=sequence_parallel, use_cpu_initialization=True,
                                perform_initialization=False)
    chunks = build_chunks(saved.preset, config)
    ckpt.load_checkpoint(saved, chunks, finetune=True)
    (policy,) = [DistributedDataParallel(config, DistributedDataParallelConfig(), chunk) for chunk in chunks]
    policy.train()
    frozen = ckpt.unwrap(policy).decoder.layers[0].mlp  # a module left in eval mode stays so
    frozen.eval()
    result = battery(policy)
    frozen_modules = {id(m) for m in frozen.modules()}
    result["modes_restored"] = all(module.training == (id(module) not in frozen_modules)
                                   for module in policy.modules())
    return result


def battery(policy) -> dict:
    def run(prompts=PROMPTS, group=GROUP, params=SAMPLED, seeds=None, new_tokens=NEW_TOKENS, **kw):
        seeds = list(range(100, 100 + len(prompts) * group)) if seeds is None else seeds
        return sample_rollouts(policy, prompts, group_size=group, params=params, row_seeds=seeds,
                               max_new_tokens=new_tokens, vocab_size=VOCAB, **kw)

    greedy = run(params=SamplingParams(greedy=True), group=1)
    sampled = run()
    # stop ids: tokens the unstopped rows sampled (a row then ends at its first one, inclusive); as rows finish,
    # the decoder drops them (a quarter at a time)
    stop_ids = [sampled[0][3], sampled[4][0], sampled[7][8], sampled[2][1], sampled[5][5]]
    return {
        "greedy": greedy,
        "greedy_penalised": run(params=SamplingParams(greedy=True, repetition_penalty=0.5), group=1),
        "sampled": sampled,
        "sampled_sliced": run(max_batch_rows=2),
        "sampled_alone": [run(prompts=[PROMPTS[i // GROUP]], group=1, seeds=[100 + i])[0]
                          for i in range(len(PROMPTS) * GROUP)],
        "stop_ids": stop_ids,
        "stopped": run(params=replace(SAMPLED, stop_ids=stop_ids)),
        "long_prompt": run(prompts=[LONG_PROMPT, PROMPTS[1]], group=2),
    }


def refusal(layout: str) -> str | None:
    """What sample_rollouts says to a virtual pipeline (PP2 x VPP2: two chunks per rank), to sequence parallelism
    over MoE layers (TP2) and to pipeline stages given different prompts: the ValueError's message (None: not
    refused)."""
    from tinyllm_mcore.model.build import build_chunks, transformer_config
    from tinyllm_mcore.model.presets import get_preset
    from tinyllm_mcore.runtime import distributed as rt

    if layout == "mismatch":  # PP2, each stage given other prompts
        import torch.distributed as dist

        preset = preset_for(4)
        rt.initialize(pp=2)
        (chunk,) = build_chunks(preset, transformer_config(preset, pipeline_model_parallel_size=2,
                                                           use_cpu_initialization=True))
        try:
            sample_rollouts(chunk, [[5, 6, 7][: 2 + dist.get_rank()]], group_size=2,
                            params=SamplingParams(greedy=True), row_seeds=[0, 1], max_new_tokens=2)
        except ValueError as e:
            return str(e)
        return None
    if layout == "vpp":
        preset = preset_for(4)
        rt.initialize(pp=2, vpp=2)
        return _refused(build_chunks(preset, transformer_config(
            preset, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
            use_cpu_initialization=True)))
    preset = get_preset("tiny-moe")
    rt.initialize(tp=2)
    (chunk,) = build_chunks(preset, transformer_config(preset, tensor_model_parallel_size=2, sequence_parallel=True,
                                                       use_cpu_initialization=True))
    return _refused(chunk)


def _refused(model) -> str | None:
    try:
        sample_rollouts(model, [[5, 6]], group_size=2, params=SamplingParams(greedy=True), row_seeds=[0, 1],
                        max_new_tokens=2)
    except ValueError as e:
        return str(e)
    return None
