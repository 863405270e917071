"""DPO: TP/PP parity of loss and log-probs, learning a preference that transfers to held-out prompts, a frozen
reference, and bad input."""

import pytest
import torch

from tests.harness import post_training_data as data

def test_dpo_loss_matches_formula():
    from tinyllm_mcore.stages.dpo import dpo_loss

    torch.manual_seed(0)
    policy, reference = torch.rand(4, 5), torch.rand(4, 5)  # per-token −log p, rows chosen/rejected/chosen/rejected
    mask = torch.tensor([[0, 1, 1, 1, 0]] * 4, dtype=torch.float32)
    beta, eps = 0.3, 0.1
    loss_sum, count, reports = dpo_loss(reference, mask, beta, eps, policy)
    lp, lr = -(policy * mask).sum(1), -(reference * mask).sum(1)
    z = beta * ((lp[0::2] - lr[0::2]) - (lp[1::2] - lr[1::2]))
    expected = (-(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)).sum()
    assert int(count) == 2
    torch.testing.assert_close(loss_sum, expected)
    torch.testing.assert_close(reports["rewards/margin"][0], z.sum())
    torch.testing.assert_close(reports["rewards/chosen"][0], beta * (lp[0::2] - lr[0::2]).sum())
    assert reports["rewards/accuracy"][0].item() == (z > 0).sum().item()


@pytest.mark.distributed
def test_dpo_and_reward_agree_across_layouts(tmp_path):
    """DPO at TP1 x DP2, TP2 and PP2 (first step: reports and grad norm), and the reward model at TP1 x DP2, TP2 with
    sequence parallelism and PP2 (five steps: the whole trajectory) give the same numbers."""
    from tests.harness.distributed import run_ranks

    cases = "tests.stages.layout_cases"
    env = {"TINYLLM_TEST_TOKENIZER": data.tokenizer_path()}  # the ranks reuse this process's tokenizer
    run_ranks(f"{cases}:make_checkpoints", 1, out=str(tmp_path), env=env)
    layouts = {"tp1": [], "tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"]}
    dpo = run_ranks(f"{cases}:dpo_first_step", 2, out=str(tmp_path), env=env,
                    cases={name: {"flags": flags} for name, flags in layouts.items()})[0]
    base = dpo["tp1"]
    assert abs(base["rewards/margin"]) > 1e-3  # policy ≠ reference: the comparison is not of zeros
    for layout in ("tp2", "pp2"):
        for key in ("dpo loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected",
                    "rewards/margin", "rewards/accuracy"):
            assert dpo[layout][key] == pytest.approx(base[key], abs=1e-4), (layout, key)
        assert dpo[layout]["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-4), layout

    layouts["tp2_sp"] = layouts.pop("tp2") + ["--sequence-parallel"]
    rewards = run_ranks(f"{cases}:reward_steps", 2, out=str(tmp_path), iterations=5, env=env,
                        cases={name: {"flags": flags} for name, flags in layouts.items()})[0]
    base = rewards["tp1"]
    assert base[-1]["reward loss"] < base[0]["reward loss"]  # it trains
    for layout in ("tp2_sp", "pp2"):
        for step, (got, want) in enumerate(zip(rewards[layout], base)):
            for key in ("reward loss", "reward accuracy", "rewards/margin", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (layout, step, key)


def sequence_logps(load, records):
    """Policy log-probs of chosen and rejected answers, per pair, from a checkpoint: [n, 2]."""
    from tinyllm_mcore.stages.dpo import sequence_logps as logps
    from tinyllm_mcore.training.batches import flatten_pairs
    from tinyllm_mcore.runtime import distributed as rt
    from tinyllm_mcore.inference.open import open_checkpoint

    dataset = data.preference_dataset(records)
    batch = flatten_pairs({k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in dataset[0]})
    rt.initialize()
    try:
        chunks = open_checkpoint(str(load)).chunks
        with torch.no_grad():
            nll = chunks[0](batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return logps(nll, batch["loss_mask"]).view(-1, 2), chunks[0]
    finally:
        rt.destroy()


def heldout_pairs():
    """Held-out phrasings (never in SFT or DPO data): correct answer vs the answer naming another country's value."""
    corpus = data.corpus()
    values = {c.name: dict(c.facts) for c in corpus.countries}
    pairs = []
    for i, r in enumerate(e for e in corpus.eval if e["split"] == "heldout_phrasing"):
        correct = values[r["entity"]][r["relation"]]
        others = sorted({v[r["relation"]] for v in values.values()} - {correct})
        pairs.append({"prompt": r["question"], "chosen": r["answer"],
                      "rejected": r["answer"].replace(correct, others[i % len(others)])})
    return pairs


def test_dpo_improves_heldout_preferences_and_keeps_reference_frozen(tmp_path):
    from tinyllm_mcore.stages import dpo
    from tinyllm_mcore.checkpoint.io import unwrap

    sft_ckpt = data.checkpoints()["sft_early"]
    pairs = heldout_pairs()
    before, _ = sequence_logps(sft_ckpt, pairs)

    reference_before = {}

    references = []

    def snapshot(ctx):  # the reference's weights right after it was built
        references.extend(ctx.references)
        for k, v in unwrap(references[0]).state_dict().items():
            if isinstance(v, torch.Tensor):
                reference_before[k] = v.clone()

    stage = dpo.make_stage(data.preference_provider(data.corpus().preference))
    after_load = stage.after_load
    stage.after_load = lambda ctx: (after_load(ctx), snapshot(ctx))
    result = data.run_stage(stage, data.common_flags(
        tmp_path, "--train-iters", "60", "--micro-batch-size", "8", "--lr", "5e-4", "--min-lr", "5e-5",
        "--load", str(sft_ckpt), "--finetune", "--save", str(tmp_path / "dpo"), "--log-interval", "20"))
    reference = references[0]
    for k, v in unwrap(reference).state_dict().items():
        if k in reference_before:
            assert torch.equal(v, reference_before[k]), f"reference weight {k} changed"
    assert all(not p.requires_grad for p in reference.parameters())
    policy = unwrap(result["chunks"][0])
    assert any(not torch.equal(p.detach(), reference_before[k]) for k, p in policy.named_parameters()
               if k in reference_before), "the policy did not train"
    train = [r for r in result["history"] if r["split"] == "train"]
    assert train[-1]["rewards/accuracy"] > 0.9 and train[-1]["rewards/margin"] > 0

    after, _ = sequence_logps(tmp_path / "dpo", pairs)
    margin_before = (before[:, 0] - before[:, 1])
    margin_after = (after[:, 0] - after[:, 1])
    accuracy_before = (margin_before > 0).float().mean().item()
    accuracy_after = (margin_after > 0).float().mean().item()
    print(f"held-out preference accuracy {accuracy_before:.3f} -> {accuracy_after:.3f}, "
          f"margin {margin_before.mean():.3f} -> {margin_after.mean():.3f}")
    assert accuracy_after > accuracy_before
    assert margin_after.mean() > margin_before.mean() + 1.0


def test_dpo_bad_input(tmp_path, capsys):
    from tinyllm_mcore.stages import dpo
    from tinyllm_mcore.training.loop import run_stage
    from tinyllm_mcore.training.batches import flatten_pairs

    # a sample without the pair dimension (e.g. a file whose rows lack `rejected`) is refused, never trained on
    single = data.sft_dataset(data.corpus().sft[:2])
    with pytest.raises(ValueError, match="pair dimension"):
        flatten_pairs({k: v.unsqueeze(0) for k, v in single[0].items()})
    # no starting checkpoint: one error line, exit 2
    from tinyllm_mcore.runtime import distributed as rt

    stage = dpo.make_stage(data.preference_provider(data.corpus().preference[:4]))
    try:
        assert run_stage(stage, data.common_flags(tmp_path, "--train-iters", "1", "--micro-batch-size", "1")) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            "error: DPO needs a starting checkpoint: --load SFT_CKPT --finetune or --load-hf HF_DIR (and/or "
            "--ref-load)"]
    finally:
        rt.destroy()
