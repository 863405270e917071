"""MoE (Qwen2-MoE layout): EP/TP parity of training, logit parity with transformers' Qwen2-MoE and bit-exact
HF round trips, and the load-balancing aux loss pulling a skewed router toward balance (CPU, gloo)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.harness.distributed import run_ranks
from tinyllm_mcore.convert import convert_hf_to_mcore, convert_mcore_to_hf
from tinyllm_mcore.convert.mapping import dist_checkpoint_shapes, hf_shapes, megatron_shapes
from tinyllm_mcore.model.presets import get_preset

TRAIN, LOGITS = "tests.model.moe_worker:train_run", "tests.model.moe_worker:inference_logits"
COMMON = ["--model-size", "tiny-moe", "--seq-length", "32", "--global-batch-size", "4", "--lr", "2e-3",
          "--min-lr", "2e-4", "--log-interval", "1", "--lr-warmup-iters", "1"]
quiet = lambda msg: None  # noqa: E731


def tiny_qwen2_moe(path: Path, *, shared: int = 32, norm_topk_prob: bool = False, seed: int = 0):
    """A random transformers Qwen2-MoE shaped like tiny-moe (vocab 1024 = its TP-padded vocab), saved to `path`."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    p = get_preset("tiny-moe", moe_shared_expert_ffn_hidden_size=shared, moe_norm_topk_prob=norm_topk_prob)
    config = Qwen2MoeConfig(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=4 * p.hidden_size,
        moe_intermediate_size=p.ffn_hidden_size, shared_expert_intermediate_size=shared,
        num_experts=p.num_experts, num_experts_per_tok=p.moe_router_topk, norm_topk_prob=norm_topk_prob,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.kv_heads, max_position_embeddings=p.max_position_embeddings, rms_norm_eps=p.norm_eps,
        rope_theta=p.rope_theta, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():  # non-trivial norms, biases and a decisive router
            param.normal_(0, 0.5 if param.dim() == 1 else 0.3 if name.endswith("mlp.gate.weight") else 0.08)
    model.save_pretrained(path)
    return model.eval(), p


def mcore_logits(ckpt, tokens):
    """Logits of a converted checkpoint at TP1 in this process (full vocab: 1024 = padded)."""
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.inference.open import open_checkpoint

    rt.initialize(1, 1)
    try:
        model = open_checkpoint(str(ckpt)).model
        with torch.no_grad():
            return model(tokens, torch.arange(tokens.size(1)).expand_as(tokens), None)
    finally:
        rt.destroy()


TOKENS = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf_sources(tmp_path_factory):
    """Two Qwen2-MoE variants: shared expert + un-normalised top-k (Qwen1.5-MoE), and no shared expert + norm_topk_prob."""
    root = tmp_path_factory.mktemp("qwen2_moe")
    out = {}
    for name, kwargs in {"shared": dict(shared=32), "plain_norm": dict(shared=0, norm_topk_prob=True)}.items():
        model, preset = tiny_qwen2_moe(root / name / "hf", **kwargs)
        convert_hf_to_mcore(root / name / "hf", root / name / "mc", log=quiet)
        out[name] = (root / name, model, preset)
    return out


@pytest.mark.parametrize("variant", ["shared", "plain_norm"])
def test_logits_match_transformers_qwen2_moe(hf_sources, variant):
    root, model, preset = hf_sources[variant]
    with torch.no_grad():
        ref = model(TOKENS).logits
    got = mcore_logits(root / "mc", TOKENS)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-4
    # the router must actually matter: a different expert choice changes the logits
    assert ref.std().item() > 0.1


@pytest.mark.parametrize("variant", ["shared", "plain_norm"])
def test_round_trip_is_bit_identical_and_loads_in_transformers(hf_sources, tmp_path, variant):
    from transformers import AutoModelForCausalLM

    root, model, preset = hf_sources[variant]
    source = load_file(root / "hf" / "model.safetensors")
    convert_mcore_to_hf(root / "mc", tmp_path / "hf", log=quiet)  # MoE: qwen2_moe by default
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert back.keys() == source.keys() == set(hf_shapes(preset))
    for k in source:
        if variant == "plain_norm" and k.endswith("shared_expert_gate.weight"):
            assert torch.count_nonzero(back[k]) == 0  # gates an empty shared expert: no effect, written as zeros
            continue
        assert torch.equal(back[k], source[k]), k
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_experts"] == 4
    assert config["norm_topk_prob"] == (variant == "plain_norm")
    assert config["shared_expert_intermediate_size"] == (32 if variant == "shared" else 0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)


def test_mapping_shapes_cover_the_megatron_model(hf_sources):
    from tinyllm_mcore.checkpoint.io import resolve_load_dir, saved_tensor_shapes

    for root, _, preset in hf_sources.values():
        saved = saved_tensor_shapes(resolve_load_dir(root / "mc"))
        assert saved == dist_checkpoint_shapes(preset)
    p = get_preset("92m-moe")
    shapes = megatron_shapes(p, 64896)
    assert shapes["decoder.layers.7.mlp.experts.local_experts.7.linear_fc1.weight"] == (2 * 704, 512)
    assert shapes["decoder.layers.0.mlp.router.weight"] == (8, 512)
    assert sum(torch.Size(s).numel() for s in megatron_shapes(p, p.vocab_size).values()) == p.num_parameters()
    # the HF export adds only Qwen2-MoE's empty shared expert: its [1, h] gate per layer
    hf_total = sum(torch.Size(s).numel() for s in hf_shapes(p).values())
    assert hf_total == p.num_parameters() + p.num_layers * p.hidden_size


def test_bad_moe_flags_and_layouts():
    from tinyllm_mcore.runtime.distributed import ParallelConfigError, check_parallel_layout
    from tinyllm_mcore.training.arguments import build_parser, validate

    with pytest.raises(ValueError, match="moe-router-topk"):
        get_preset("tiny-moe", moe_router_topk=5)
    with pytest.raises(ValueError, match="needs --num-experts"):
        get_preset("tiny", moe_shared_expert_ffn_hidden_size=32)
    args = build_parser("t").parse_args(["--mock-data", "--moe-expert-capacity-factor", "0"])
    with pytest.raises(ValueError, match="capacity-factor"):
        validate(args)
    with pytest.raises(ParallelConfigError, match="not divisible by expert-parallel"):
        check_parallel_layout(2, 1, 1, 4, 2, ep=2, num_experts=3)
    with pytest.raises(ParallelConfigError, match="must divide the data-parallel size 1"):
        check_parallel_layout(2, 2, 1, 4, 2, ep=2, num_experts=4)  # TP2 x EP2 needs 4 ranks
    assert check_parallel_layout(4, 2, 1, 4, 2, ep=2, num_experts=4) == 2
    with pytest.raises(ParallelConfigError, match="needs a MoE model"):
        check_parallel_layout(2, 1, 1, 4, 2, ep=2, num_experts=0)


# ------------------------------------------------------------------------- training (multi-process: distributed)
@pytest.fixture(scope="module")
def results(tmp_path_factory, hf_sources):
    tmp = tmp_path_factory.mktemp("moe_parity")
    init = tmp / "init"
    five = COMMON + ["--train-iters", "5", "--load", str(init), "--finetune"]
    skewed = ["--model-size", "tiny-moe", "--moe-router-topk", "1", "--seq-length", "32", "--global-batch-size", "4",
              "--micro-batch-size", "4", "--lr", "1e-2", "--lr-decay-style", "constant", "--lr-warmup-iters", "0",
              "--log-interval", "10", "--train-iters", "30", "--load", str(init), "--finetune"]
    single = run_ranks(TRAIN, nproc=1, cases={
        "init": {"argv": COMMON + ["--train-iters", "0", "--micro-batch-size", "4", "--save", str(init)]},
        "tp1": {"argv": five + ["--micro-batch-size", "4"]},
        "skew_no_aux": {"argv": skewed + ["--moe-aux-loss-coeff", "0"], "skew_router": True},
        "skew_aux": {"argv": skewed + ["--moe-aux-loss-coeff", "1"], "skew_router": True},
    })[0]
    hf_ckpt = str(hf_sources["shared"][0] / "mc")
    double = run_ranks(TRAIN, nproc=2, cases={
        # the aux loss is computed per micro-batch, so EP2 (DP2, micro-batch 2) is compared with EP1 at DP2
        "ep1_dp2": {"argv": five + ["--micro-batch-size", "2"]},
        "ep2": {"argv": five + ["--micro-batch-size", "2", "--expert-model-parallel-size", "2"]},
        "tp2": {"argv": five + ["--micro-batch-size", "4", "--tensor-model-parallel-size", "2"]},
        "ep2_capacity": {"argv": five + ["--micro-batch-size", "2", "--expert-model-parallel-size", "2",
                                         "--moe-expert-capacity-factor", "1.0"]},
        "logits_ep2": (LOGITS, {"load": hf_ckpt, "tokens": TOKENS.tolist(), "ep": 2}),
        "logits_tp2": (LOGITS, {"load": hf_ckpt, "tokens": TOKENS.tolist(), "tp": 2}),
    })[0]
    return {**single, **double}


@pytest.mark.distributed
def test_expert_and_tensor_parallel_losses_match(results):
    ref = results["tp1"]["train"]["lm loss"]
    assert len(ref) == 5 and ref[-1] < ref[0]
    for name, other in [("ep2", "ep1_dp2"), ("tp2", "tp1"), ("ep1_dp2", "tp1")]:
        got, want = results[name]["train"]["lm loss"], results[other]["train"]["lm loss"]
        assert abs(got[0] - want[0]) < 1e-5, (name, got, want)
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (name, got, want)
    # same weights, same tokens per micro-batch: EP2 also reports megatron's aux loss and the expert loads identically
    for key in ("moe aux loss", "moe load imbalance"):
        assert results["ep2"]["train"][key] == pytest.approx(results["ep1_dp2"]["train"][key], abs=1e-5), key


@pytest.mark.distributed
def test_metrics_are_logged_and_capacity_drops_tokens(results):
    train = results["tp1"]["train"]
    assert all(1.0 <= a < 1.2 for a in train["moe aux loss"])  # 1.0 = perfectly balanced
    assert all(len(layers) == 2 and len(layers[0]) == 4 for layers in train["expert_load"])
    assert all(abs(sum(layer) - 1) < 1e-9 for layers in train["expert_load"] for layer in layers)
    assert all(d == 0 for d in train["moe dropped fraction"])
    # capacity factor 1.0: per rank and micro-batch an expert takes at most 2 x 32 tokens x top-2 / 4 experts = 32
    # assignments; the 2 DP ranks together at most 64. Without dropping some expert takes more.
    capped, free = results["ep2_capacity"]["train"], results["ep2"]["train"]
    assert all(max(layer) <= 64 for layers in capped["expert_tokens"] for layer in layers)
    assert all(d > 0 for d in capped["moe dropped fraction"])
    assert max(max(layer) for layers in free["expert_tokens"] for layer in layers) > 64
    assert all(sum(layer) == 2 * 64 * 2 for layers in free["expert_tokens"] for layer in layers)


@pytest.mark.distributed
def test_hf_logits_at_ep2_and_tp2(results, hf_sources):
    _, model, _ = hf_sources["shared"]
    with torch.no_grad():
        ref = model(TOKENS).logits
    for name in ("logits_ep2", "logits_tp2"):
        assert (torch.tensor(results[name]) - ref).abs().max().item() < 1e-4, name


@pytest.mark.distributed
def test_aux_loss_balances_a_skewed_router(results):
    """Every token starts on expert 0 (top-1 of 4: imbalance 4 = all load on one expert). With the aux loss the
    router spreads the load; without it the same training leaves it concentrated."""
    off, on = results["skew_no_aux"]["train"], results["skew_aux"]["train"]
    assert off["moe load imbalance"][0] > 3.9 and on["moe load imbalance"][0] > 3.9
    last = lambda xs: sum(xs[-10:]) / 10  # noqa: E731
    assert last(on["moe load imbalance"]) < last(off["moe load imbalance"]) - 0.7, (on, off)
    assert last(on["moe load entropy"]) > last(off["moe load entropy"]) + 0.2
    assert on["moe aux loss"][-1] < on["moe aux loss"][0] - 0.5  # megatron's aux loss itself falls (E=4 -> 1)
