"""LoRA (model/lora.py) on a real SFT run: step 0 is the base model, TP2 and PP2 give TP1's steps, only the adapters
train, and megatron's optimizer holds state for the adapters alone."""
import pytest

from tests.harness import post_training_data as data


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_sft_agrees_across_layouts_and_trains_only_adapters(tmp_path):
    from tests.harness.distributed import run_ranks

    env = {"TINYLLM_TEST_TOKENIZER": data.tokenizer_path()}
    run_ranks("tests.stages.layout_cases:make_checkpoints", 1, out=str(tmp_path), env=env)
    layouts = {"tp1": [], "tp2": ["--tensor-model-parallel-size", "2"],
               "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
               "pp2": ["--pipeline-model-parallel-size", "2"]}
    cases = {name: {"flags": flags, "iterations": 4} for name, flags in layouts.items()}
    cases.update({f"dpo_{name}": ("tests.stages.lora_cases:lora_dpo_first_step", {"flags": layouts[name]})
                  for name in ("tp1", "tp2")})
    cases["dpo_full"] = ("tests.stages.layout_cases:dpo_first_step", {"flags": []})
    per_rank = run_ranks("tests.stages.lora_cases:lora_sft_steps", 2, out=str(tmp_path), env=env, cases=cases)
    dpo = per_rank[0]
    for name in ("dpo_tp1", "dpo_tp2"):  # DPO with adapters: the full model's first step (B = 0), at TP1 and TP2
        for key in ("dpo loss", "rewards/margin", "logps/chosen"):
            assert dpo[name][key] == pytest.approx(dpo["dpo_full"][key], rel=1e-6), (name, key)
        assert dpo[name]["grad_norm"] == pytest.approx(dpo["dpo_tp1"]["grad_norm"], rel=1e-6), name
    base = per_rank[0]["tp1"]
    assert base["steps"][0]["lm loss"] == base["base_loss"]  # B = 0: the first step is the base model's
    assert base["steps"][-1]["lm loss"] < base["steps"][0]["lm loss"] - 0.05  # and the adapters learn
    for name in layouts:
        for rank, result in enumerate(per_rank):
            got = result[name]
            assert got["base_unchanged"] and got["base_keys"] == got["base_keys_expected"] > 0, (name, rank)
            assert got["trainable_is_adapters"], (name, rank)
            assert got["optimizer_numel"] == got["adapter_numel"] > 0, (name, rank)
            assert got["optimizer_state_numel"] == 2 * got["adapter_numel"], (name, rank)  # Adam's two moments
            assert got["b_norm"] > 0, (name, rank)  # B moved off zero
        got = per_rank[0][name]  # the last pipeline stage (rank 1 at PP2) reports the losses on every rank
        assert got["base_loss"] == pytest.approx(base["base_loss"], rel=1e-5), name
        for step, (g, w) in enumerate(zip(got["steps"], base["steps"])):
            assert g["lm loss"] == pytest.approx(w["lm loss"], rel=1e-6), (name, step)
            assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-6), (name, step)


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "0"], "error: --lora-rank 0: must be >= 1"),
    (["--lora-alpha", "8"], "error: --lora-alpha needs --lora-rank R"),
    (["--lora-rank", "4", "--lora-target", "qkv,mlp"],
     "error: --lora-target 'qkv,mlp': use a comma-separated subset of qkv,proj,fc1,fc2"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "error: --lora-dropout 1: must be in [0, 1)"),
])
def test_lora_bad_flags(tmp_path, capsys, flags, message):
    from tinyllm_mcore.stages import sft
    from tinyllm_mcore.training.loop import run_stage

    stage = sft.make_stage(data.sft_provider(data.corpus().sft[:2]))
    assert run_stage(stage, data.common_flags(tmp_path, "--train-iters", "1", *flags)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
