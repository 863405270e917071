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
    (["--lora-rank", "4"], "error: --lora-rank needs --load CHECKPOINT: the adapters train on that checkpoint's "
                           "frozen weights (a LoRA checkpoint holds only adapters and points at it)"),
])
def test_lora_bad_flags(tmp_path, capsys, flags, message):
    from tinyllm_mcore.stages import sft
    from tinyllm_mcore.training.loop import run_stage

    stage = sft.make_stage(data.sft_provider(data.corpus().sft[:2]))
    assert run_stage(stage, data.common_flags(tmp_path, "--train-iters", "1", *flags)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_checkpoint_holds_adapters_resumes_exactly_and_refuses_a_changed_base(tmp_path, capsys):
    """A LoRA checkpoint (TP2) has only adapter tensors and names its base by path and manifest sha256; resuming it
    continues the straight run's losses exactly; generate opens it (base + adapters); a changed base is one line."""
    import json

    from tests.harness.distributed import run_ranks
    from tinyllm_mcore.checkpoint import safety

    env = {"TINYLLM_TEST_TOKENIZER": data.tokenizer_path()}
    run_ranks("tests.stages.layout_cases:make_checkpoints", 1, out=str(tmp_path), env=env)
    result = run_ranks("tests.stages.lora_cases:lora_resume", 2, out=str(tmp_path), env=env,
                       flags=["--tensor-model-parallel-size", "2"],
                       other_flags=["--pipeline-model-parallel-size", "2"])[0]
    assert result["resumed"] == result["straight"] and len(result["straight"]) == 4
    assert result["grad_norms"][0] == result["grad_norms"][1]
    # the TP2 checkpoint of iteration 2 resumed at PP2: the adapters and their Adam state reshard
    assert result["resumed_other_layout"] == pytest.approx(result["straight"][2:], rel=1e-6)
    keys = result["saved_keys"]
    model_keys = [k for k in keys if k.startswith(("decoder.", "embedding.", "output_layer."))]
    assert model_keys and all("_lora." in k for k in model_keys), keys
    # 4 targets x (A, B), the layers stacked as megatron stores them
    assert len(model_keys) == 4 * 2, model_keys
    base_dir = tmp_path / "policy" / "iter_0000000"
    assert result["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["qkv", "proj", "fc1", "fc2"]}
    assert result["lora_base"] == {"path": str(base_dir.resolve()),
                                   "manifest_checksum": safety.manifest_checksum(base_dir)}

    _check_exports(tmp_path, tmp_path / "lora_resume")

    # the base changes (here: its manifest is rewritten, as a re-save of that folder would): refused, one line
    from tinyllm_mcore.cli import generate
    from tinyllm_mcore.runtime import distributed as rt

    argv = ["--load", str(tmp_path / "lora_resume"), "--tokenizer-model", data.tokenizer_path(), "--prompt", "hi",
            "--max-new-tokens", "2", "--greedy"]
    try:
        assert generate.main(argv) == 0  # inference opens base + adapters
    finally:
        rt.destroy()
    capsys.readouterr()
    manifest = base_dir / safety.MANIFEST
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(record, indent=2))
    try:
        assert generate.main(argv) != 0
    finally:
        rt.destroy()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "LoRA base checkpoint" in err[0] \
        and "changed since the adapters were trained" in err[0], err


def _check_exports(tmp_path, lora_ckpt):
    """tinyllm-mcore-to-hf of a LoRA checkpoint: the merged model's logits are the megatron model's (base +
    adapters), and PEFT's load of --peft-adapter on the base's export gives the merged model's logits."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    peft = pytest.importorskip("peft")
    from tinyllm_mcore.cli import mcore_to_hf
    from tinyllm_mcore.inference.open import open_checkpoint
    from tinyllm_mcore.runtime import distributed as rt

    base_hf, merged_hf, adapter = tmp_path / "base_hf", tmp_path / "merged_hf", tmp_path / "adapter"
    assert mcore_to_hf.main(["--load", str(tmp_path / "policy"), "--save", str(base_hf), "--quiet"]) == 0
    assert mcore_to_hf.main(["--load", str(lora_ckpt), "--save", str(merged_hf), "--peft-adapter", str(adapter),
                             "--quiet"]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61, 12, 400]])
    try:
        model = open_checkpoint(str(lora_ckpt)).model
        with torch.no_grad():
            mcore = model(tokens, torch.arange(tokens.shape[1])[None], None)[..., :data.tokenizer().vocab_size]
    finally:
        rt.destroy()
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_hf, dtype=torch.float32).eval()(tokens).logits
        base_model = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32).eval()
        base = base_model(tokens).logits
        with_adapter = peft.PeftModel.from_pretrained(base_model, str(adapter)).eval()(tokens).logits
    assert (merged - base).abs().max() > 1e-2  # the adapters change the model
    torch.testing.assert_close(merged, mcore.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(with_adapter, merged, rtol=0, atol=1e-5)

    # the KV-cache decoder (generate, GRPO's rollouts) runs the adapters too: greedy tokens are the merged model's
    from tests.inference.test_generate import hf_prompts
    from tinyllm_mcore.inference import generate as inference

    def hf_greedy(path, prompt):  # 8 argmax steps of the full forward, no stop token
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(8):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]

    try:
        generator, _ = inference.load_generator(str(lora_ckpt), data.tokenizer())
        ours = generator.generate(hf_prompts(), inference.SamplingParams(max_new_tokens=8, greedy=True))
    finally:
        rt.destroy()
    assert ours == [hf_greedy(merged_hf, p) for p in hf_prompts()]
    assert ours != [hf_greedy(base_hf, p) for p in hf_prompts()]


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_grpo_rollouts_and_steps_agree_across_layouts():
    """GRPO with adapters, its own rollouts (the KV-cache decoder with the adapters): the first step's rollouts and
    loss are the full model's (B = 0), and TP2 gives TP1's two steps (the second step's rollouts see trained
    adapters)."""
    from tests.harness import arithmetic
    from tests.harness.distributed import run_ranks
    from tests.stages.test_grpo import REAL

    load = str(arithmetic.checkpoints()["sft"])
    env = {"TINYLLM_TEST_TOKENIZER": arithmetic.tokenizer().model_path}
    cases = "tests.stages.grpo_cases:grpo_steps"
    lora_flags = ["--lora-rank", "4", "--lora-alpha", "16", *REAL, "--lr", "1e-2"]
    one = run_ranks(None, 1, env=env, cases={
        "full": (cases, {"load": load, "flags": [*REAL, "--lr", "1e-2"], "iterations": 1, "real_rollouts": True}),
        "lora": (cases, {"load": load, "flags": lora_flags, "iterations": 2, "real_rollouts": True})})[0]
    two = run_ranks(None, 2, env=env, cases={
        "lora_tp2": (cases, {"load": load, "flags": [*lora_flags, "--tensor-model-parallel-size", "2"],
                             "iterations": 2, "real_rollouts": True})})[0]
    full, lora, tp2 = one["full"][0], one["lora"], two["lora_tp2"]
    timings = ("rollout s", "rollout tokens/s")
    shared = [k for k in full if k not in ("iteration", "split", "lr", "grad_norm", *timings)]
    assert shared
    for key in shared:
        assert lora[0][key] == pytest.approx(full[key], rel=1e-6, abs=1e-7), key
    assert len(lora) == len(tp2) == 2
    for step, (got, want) in enumerate(zip(tp2, lora)):
        for key in [*shared, "grad_norm"]:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (step, key)


def test_lora_refused_where_it_cannot_train(tmp_path, capsys):
    from tinyllm_mcore.stages import reward, sft
    from tinyllm_mcore.training.loop import run_stage

    stage = reward.make_stage(data.preference_provider(data.corpus().preference[:2]))
    argv = data.common_flags(tmp_path, "--train-iters", "1", "--lora-rank", "4", "--load", str(tmp_path / "none"))
    assert run_stage(stage, argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --lora-rank: the reward stage trains a new reward head, which adapters on a frozen model would "
        "leave untrained; train it in full"]
    stage = sft.make_stage(data.sft_provider(data.corpus().sft[:2]))
    assert run_stage(stage, [*argv, "--save", str(tmp_path / "out"), "--save-hf"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --save-hf is not available with --lora-rank: export the LoRA checkpoint with tinyllm-mcore-to-hf "
        "(the merged model, or --peft-adapter DIR)"]
