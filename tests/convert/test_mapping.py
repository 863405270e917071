"""The mapping table: fused-QKV and fc1 layouts, vocab padding, shapes from the preset, HF config validation, and
that the table names every parameter of the megatron model and of the transformers model, dense and MoE."""
import pytest
import torch

from tinyllm_mcore.convert import mapping as m
from tinyllm_mcore.convert.hf_config import hf_config, preset_from_hf_config
from tinyllm_mcore.model.presets import get_preset

MOE = dict(num_experts=4, moe_router_topk=2)


@pytest.mark.parametrize("groups", [None, 2, 1])
def test_qkv_fusion_is_per_query_group_and_invertible(groups):
    p = get_preset("tiny", num_query_groups=groups)
    d, nq, nkv, h = p.head_dim, p.num_attention_heads, p.kv_heads, p.hidden_size
    qkv = m.FusedQKV(nkv, d, nq // nkv)
    q, k, v = torch.randn(nq * d, h), torch.randn(nkv * d, h), torch.randn(nkv * d, h)
    fused = qkv.to_megatron([q, k, v])
    assert fused.shape == ((nq + 2 * nkv) * d, h)
    per = nq // nkv
    for g in range(nkv):  # group g: its q heads, then its k head, then its v head
        block = fused[g * (per + 2) * d:(g + 1) * (per + 2) * d]
        assert torch.equal(block[:per * d], q[g * per * d:(g + 1) * per * d])
        assert torch.equal(block[per * d:(per + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(block[(per + 1) * d:], v[g * d:(g + 1) * d])
    assert all(torch.equal(a, b) for a, b in zip(qkv.to_hf(fused), (q, k, v)))
    bias = [torch.randn(t.shape[0]) for t in (q, k, v)]
    assert all(torch.equal(a, b) for a, b in zip(qkv.to_hf(qkv.to_megatron(bias)), bias))


def test_gate_up_and_vocab_padding():
    gate, up = torch.randn(3, 2), torch.randn(3, 2)
    fc1 = m.GateUp().to_megatron([gate, up])
    assert torch.equal(fc1[:3], gate) and torch.equal(fc1[3:], up)
    w = torch.randn(1000, 4)
    padded = m.PaddedVocab(1000, 1024).to_megatron([w])
    assert padded.shape == (1024, 4) and torch.equal(padded[:1000], w) and not padded[1000:].any()
    assert torch.equal(m.PaddedVocab(1000, 1024).to_hf(padded)[0], w)


def test_shapes_follow_the_preset_and_padding():
    p = get_preset("92m")
    mc = m.megatron_shapes(p, 65024)
    assert mc[m.MC_EMBED] == (65024, 512) and mc["decoder.layers.7.mlp.linear_fc1.weight"] == (2816, 512)
    assert sum(torch.Size(s).numel() for s in m.hf_shapes(p).values()) == p.num_parameters()
    dist = m.dist_checkpoint_shapes(p, tensor_model_parallel_size=2)
    assert dist["decoder.layers.self_attention.linear_qkv.weight"] == (8, 1536, 512)
    assert dist["decoder.layers.self_attention.linear_qkv.layer_norm_weight"] == (8, 512)
    assert dist["output_layer.weight"] == (65024, 512)  # 64798 padded to a multiple of 128 x TP2


def test_te_and_local_names():
    assert m.te_name("input_layernorm.weight") == "self_attention.linear_qkv.layer_norm_weight"
    assert m.local_name("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.3.pre_mlp_layernorm.weight"
    assert m.local_name("decoder.layers.3.mlp.linear_fc1.weight") == "decoder.layers.3.mlp.linear_fc1.weight"


def test_hf_to_megatron_and_back_on_plain_tensors():
    p = get_preset("tiny", vocab_size=1000, num_query_groups=2)
    hf = {k: torch.randn(s) for k, s in m.hf_shapes(p).items()}
    table = m.mapping_table(p, 1024, o_proj_bias=True)  # as the importer reads: a zero o_proj bias is accepted
    mc = {name: t for name, t, _ in m.hf_to_megatron(table, hf.get)}
    assert mc.keys() == m.megatron_shapes(p, 1024).keys()
    back = {name: t for name, t, _ in m.megatron_to_hf(m.mapping_table(p, 1024), mc.__getitem__)}
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    hf["model.layers.0.self_attn.o_proj.bias"] = torch.ones(p.hidden_size)
    with pytest.raises(m.MappingError, match="o_proj.bias is non-zero"):
        list(m.hf_to_megatron(table, hf.get))
    del hf["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(m.MappingError, match="up_proj.weight is missing"):
        list(m.hf_to_megatron(m.mapping_table(p, 1024), hf.get))


def test_hf_config_validation():
    base = {"model_type": "qwen2", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 8, "intermediate_size": 1408, "vocab_size": 64798, "max_position_embeddings": 1024}
    preset, facts = preset_from_hf_config(base)
    assert preset == get_preset("92m") and not facts.tied and facts.attention_bias
    assert preset_from_hf_config({**base, "model_type": "tinyllm"})[0].name == "92m"
    assert not preset_from_hf_config({**base, "model_type": "llama", "attention_bias": False})[1].attention_bias
    for bad, msg in [({"model_type": "gpt2"}, "unsupported architecture"), ({"hidden_act": "gelu"}, "hidden_act"),
                     ({"rope_scaling": {"rope_type": "yarn"}}, "rope scaling"), ({"head_dim": 32}, "head_dim"),
                     ({"num_key_value_heads": 3}, "not divisible")]:
        with pytest.raises(m.MappingError, match=msg):
            preset_from_hf_config({**base, **bad})
    # config.json written for a preset reads back as that preset (dense as llama, MoE as qwen2_moe)
    for p in (get_preset("tiny", vocab_size=1000, num_query_groups=2), get_preset("tiny", vocab_size=1000, **MOE),
              get_preset("tiny", vocab_size=1000, moe_shared_expert_ffn_hidden_size=96, **MOE)):
        assert preset_from_hf_config(hf_config(p))[0].replace(name=p.name) == p


@pytest.mark.parametrize("preset", [
    get_preset("tiny", vocab_size=1000, num_query_groups=2),
    get_preset("tiny", vocab_size=1000, **MOE),
    get_preset("tiny", vocab_size=1000, moe_shared_expert_ffn_hidden_size=96, moe_norm_topk_prob=True, **MOE),
], ids=["dense", "moe", "moe-shared-expert"])
def test_table_covers_every_parameter_both_ways(preset, tmp_path):
    """Every parameter of megatron's model and of transformers' model is in the table, with its shape, and nothing
    else is: a tensor the table missed would be silently left at its initial value by a conversion."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinyllm_mcore.convert.mcore_model import single_process_megatron, whole_model

    with single_process_megatron():
        model = whole_model(preset, 1024)
    megatron = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    assert m.megatron_shapes(preset, 1024) == megatron

    # the tensors transformers saves for the config the export writes (llama with o_proj bias, or qwen2_moe: on
    # disk per expert, whatever layout the library uses in memory)
    config = hf_config(preset)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as saved:
        hf = {k: tuple(saved.get_slice(k).get_shape()) for k in saved.keys()}
    assert m.hf_shapes(preset, o_proj_bias=config["model_type"] == "llama") == hf

    # both directions through the table give back the same tensors
    table = m.mapping_table(preset, 1024, o_proj_bias=config["model_type"] == "llama")
    source = {k: torch.randn(s) for k, s in megatron.items()}
    for name in (m.MC_EMBED, m.MC_OUTPUT):  # megatron's padded vocab rows are zeros; the export strips them
        source[name][preset.vocab_size:] = 0
    exported = dict((name, t) for name, t, _ in m.megatron_to_hf(table, source.__getitem__))
    assert exported.keys() == hf.keys()
    back = {name: t for name, t, _ in m.hf_to_megatron(table, exported.get)}
    assert back.keys() == source.keys() and all(torch.equal(back[k], source[k]) for k in source)
