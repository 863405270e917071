"""model.build, the one model assembly: the dtype rule, the config's dtypes, and this rank's chunks (pipeline position,
virtual-pipeline chunks, head, half-precision wrapper, device, the init hook)."""
import pytest
import torch

from tinyllm_mcore.model.build import build_chunks, model_dtype, transformer_config
from tinyllm_mcore.model.presets import get_preset

PRESET = get_preset("tiny")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("bf16,fp16,dtype", [(False, False, torch.float32), (True, False, torch.bfloat16),
                                             (False, True, torch.float16)])
def test_precision_flags_choose_the_weights_and_pipeline_dtype(bf16, fp16, dtype):
    assert model_dtype(bf16, fp16) == dtype
    config = transformer_config(PRESET, bf16=bf16, fp16=fp16, use_cpu_initialization=True)
    assert (config.params_dtype, config.pipeline_dtype, config.bf16, config.fp16) == (dtype, dtype, bf16, fp16)


@pytest.fixture(scope="module")
def single_process():
    from tinyllm_mcore.runtime import distributed as rt

    rt.initialize()
    yield
    rt.destroy()


def test_one_chunk_with_embedding_and_head_given_to_the_init_hook_before_it_moves(single_process):
    seen = []
    config = transformer_config(PRESET, use_cpu_initialization=True)
    (model,) = build_chunks(PRESET, config, init_weights=lambda m: seen.append((m, next(m.parameters()).device.type)))
    assert type(model).__name__ == "TinyLLMGPTModel" and model.pre_process and model.post_process
    assert model.vp_stage is None and len(model.decoder.layers) == PRESET.num_layers
    assert seen == [(model, "cpu")]  # use_cpu_initialization: built on the CPU, then moved
    assert {p.device.type for p in model.parameters()} == {DEVICE}
    (on_cpu,) = build_chunks(PRESET, config, device="cpu")  # the converters' whole model
    assert {p.device.type for p in on_cpu.parameters()} == {"cpu"}
    # the embedding rows are padded to make_vocab_size_divisible_by x TP
    assert model.embedding.word_embeddings.weight.shape[0] == 1024
    (unpadded,) = build_chunks(PRESET, config, make_vocab_size_divisible_by=1000)
    assert unpadded.embedding.word_embeddings.weight.shape[0] == 2000


def test_half_precision_chunks_are_wrapped_for_training_and_bare_for_inference(single_process):
    from megatron.core.transformer.module import Float16Module

    config = transformer_config(PRESET, bf16=True, use_cpu_initialization=True)
    torch.manual_seed(0)
    (training,) = build_chunks(PRESET, config)
    torch.manual_seed(0)
    (inference,) = build_chunks(PRESET, config, half_precision_wrapper=False)
    assert isinstance(training, Float16Module) and not isinstance(inference, Float16Module)
    assert {p.dtype for p in training.parameters()} == {p.dtype for p in inference.parameters()} == {torch.bfloat16}
    tokens = torch.arange(8, device=DEVICE).unsqueeze(0)
    with torch.no_grad():
        wrapped, bare = (m.eval()(tokens, tokens.clone(), None) for m in (training, inference))
    assert wrapped.dtype == torch.float32 and bare.dtype == torch.bfloat16  # Float16Module hands the loss fp32
    torch.testing.assert_close(wrapped, bare.float())  # same seed, same weights


def test_reward_head_is_seeded_and_unknown_heads_are_refused(single_process):
    config = transformer_config(PRESET, use_cpu_initialization=True)
    heads = [build_chunks(PRESET, config, head="reward", seed=seed)[0] for seed in (3, 3, 4)]
    assert all(m.output_layer is None and m.reward_head.weight.shape == (1, PRESET.hidden_size) for m in heads)
    assert torch.equal(heads[0].reward_head.weight, heads[1].reward_head.weight)
    assert not torch.equal(heads[0].reward_head.weight, heads[2].reward_head.weight)
    with pytest.raises(ValueError, match="unknown model head 'value'"):
        build_chunks(PRESET, config, head="value")


@pytest.mark.distributed
def test_virtual_pipeline_chunks_carry_their_pipeline_position():
    """PP2 x VPP2 over the tiny preset's 4 layers: rank r's chunk v holds layer 2v + r + 1; the embedding is on the
    first chunk of the pipeline only, the head on its last."""
    from tests.harness.distributed import run_ranks

    per_rank = run_ranks("tests.model.build_worker:chunk_positions", nproc=2, pp=2, vpp=2, timeout=300)
    expected = [[{"vp_stage": v, "pre_process": (r, v) == (0, 0), "post_process": (r, v) == (1, 1),
                  "layers": [2 * v + r + 1], "embedding": (r, v) == (0, 0), "output_layer": (r, v) == (1, 1)}
                 for v in range(2)] for r in range(2)]
    assert per_rank == expected
