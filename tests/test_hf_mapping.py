"""hf_mapping: fused-QKV and fc1 layouts, vocab padding, shapes from the preset, HF config validation."""
import pytest
import torch

from tinyllm_mcore import hf_mapping as hm
from tinyllm_mcore.presets import get_preset


@pytest.mark.parametrize("groups", [None, 2, 1])
def test_qkv_fusion_is_per_query_group_and_invertible(groups):
    p = get_preset("tiny", num_query_groups=groups)
    d, nq, nkv, h = p.head_dim, p.num_attention_heads, p.kv_heads, p.hidden_size
    q, k, v = torch.randn(nq * d, h), torch.randn(nkv * d, h), torch.randn(nkv * d, h)
    fused = hm.fuse_qkv(q, k, v, p)
    assert fused.shape == ((nq + 2 * nkv) * d, h)
    per = nq // nkv
    for g in range(nkv):  # group g: its q heads, then its k head, then its v head
        block = fused[g * (per + 2) * d:(g + 1) * (per + 2) * d]
        assert torch.equal(block[:per * d], q[g * per * d:(g + 1) * per * d])
        assert torch.equal(block[per * d:(per + 1) * d], k[g * d:(g + 1) * d])
        assert torch.equal(block[(per + 1) * d:], v[g * d:(g + 1) * d])
    assert all(torch.equal(a, b) for a, b in zip(hm.split_qkv(fused, p), (q, k, v)))
    bias = [torch.randn(t.shape[0]) for t in (q, k, v)]
    assert all(torch.equal(a, b) for a, b in zip(hm.split_qkv(hm.fuse_qkv(*bias, p), p), bias))


def test_shapes_follow_the_preset_and_padding():
    p = get_preset("92m")
    mc = hm.megatron_shapes(p, 65024)
    assert mc[hm.MC_EMBED] == (65024, 512) and mc["decoder.layers.7.mlp.linear_fc1.weight"] == (2816, 512)
    assert sum(torch.Size(s).numel() for s in hm.hf_shapes(p).values()) == p.num_parameters()
    dist = hm.dist_checkpoint_shapes(p, tensor_model_parallel_size=2)
    assert dist["decoder.layers.self_attention.linear_qkv.weight"] == (8, 1536, 512)
    assert dist["decoder.layers.self_attention.linear_qkv.layer_norm_weight"] == (8, 512)
    assert dist["output_layer.weight"] == (65024, 512)  # 64798 padded to a multiple of 128 x TP2
    w = torch.randn(1000, 4)
    padded = hm.pad_vocab_rows(w, 1024)
    assert torch.equal(padded[:1000], w) and not padded[1000:].any()


def test_te_and_local_names():
    assert hm.megatron_layer_name(3, "input_layernorm.weight", te=True) == \
        "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"
    assert hm.to_local_name("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.3.pre_mlp_layernorm.weight"


def test_hf_to_megatron_and_back_on_plain_tensors():
    p = get_preset("tiny", vocab_size=1000, num_query_groups=2)
    hf = {k: torch.randn(s) for k, s in hm.hf_shapes(p).items()}
    mc = {name: t for name, t, _ in hm.hf_to_megatron(p, hf.get, 1024)}
    assert mc.keys() == hm.megatron_shapes(p, 1024).keys()
    back = {name: t for name, t, _ in hm.megatron_to_hf(p, mc.__getitem__)}
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    hf["model.layers.0.self_attn.o_proj.bias"] = torch.ones(p.hidden_size)
    with pytest.raises(hm.MappingError, match="non-zero"):
        list(hm.hf_to_megatron(p, hf.get, 1024))


def test_hf_config_validation():
    base = {"model_type": "qwen2", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 8, "intermediate_size": 1408, "vocab_size": 64798, "max_position_embeddings": 1024}
    preset, facts = hm.preset_from_hf_config(base)
    assert preset == get_preset("92m") and not facts["tied"]
    assert hm.preset_from_hf_config({**base, "model_type": "tinyllm"})[0].name == "92m"
    for bad, msg in [({"model_type": "gpt2"}, "unsupported architecture"), ({"hidden_act": "gelu"}, "hidden_act"),
                     ({"rope_scaling": {"rope_type": "yarn"}}, "rope scaling"), ({"head_dim": 32}, "head_dim"),
                     ({"num_key_value_heads": 3}, "not divisible")]:
        with pytest.raises(hm.MappingError, match=msg):
            hm.preset_from_hf_config({**base, **bad})
