"""GRPO's math (model/losses.py) against values and gradients worked out by hand: group-relative advantages with tied
groups flagged, PPO's ratio clip on each side of 1 for both signs of the advantage, the k3 KL and its gradient, and
the token mean of the loop's (sum, count) convention."""
import math

import pytest
import torch

from tinyllm_mcore.model.losses import GroupAdvantages, grpo_loss


def test_group_advantages_standardise_each_group_and_flag_ties():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,     # mean 1/2, std (Bessel) sqrt(1/3)
                            1.0, 1.0, 1.0, 1.0,     # all tie: no signal
                            0.5, 0.0, 0.0, 0.0])    # mean 1/8, std 1/4
    groups = GroupAdvantages(rewards, group_size=4, eps=1e-6)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = [a, -a, -a, a, 0, 0, 0, 0, 0.375 / (0.25 + 1e-6), *[-0.125 / (0.25 + 1e-6)] * 3]
    torch.testing.assert_close(groups.advantages, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert groups.tied.tolist() == [False, True, False] and groups.tied_groups == 1
    assert groups.sequence_keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    torch.testing.assert_close(groups.mean, torch.tensor([0.5, 1.0, 0.125]))
    torch.testing.assert_close(groups.std, torch.tensor([math.sqrt(1 / 3), 0.0, 0.25]))


def test_group_advantages_refuse_groups_of_one_and_ragged_groups():
    with pytest.raises(ValueError, match="at least 2 samples"):
        GroupAdvantages(torch.zeros(4), group_size=1)
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        GroupAdvantages(torch.zeros(6), group_size=4)


def test_on_policy_loss_is_minus_advantage_times_log_prob_token_mean():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss_sum, count, report = grpo_loss(logps, mask, torch.tensor([2.0, -1.0]), clip_eps=0.2, kl_beta=0.0)
    loss_sum.backward()
    # ratio ≡ 1: per token −A, so −2 −2 +1 over 3 response tokens; d/dlogp = −A on response tokens only
    assert loss_sum.item() == pytest.approx(-3.0) and count.item() == 3
    torch.testing.assert_close(logps.grad, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 0.0, 0.0]]))
    assert report["grpo loss"].tolist() == pytest.approx([-3.0, 3.0])
    assert report["clip fraction"].tolist() == [0.0, 3.0] and report["ratio"].tolist() == pytest.approx([3.0, 3.0])
    assert "kl" not in report


def test_ratio_clip_inside_and_outside_for_both_advantage_signs():
    old = torch.full((2, 3), -2.0)
    delta = torch.tensor([[0.1, 0.5, -0.5],    # A = +1: inside, above 1+ε (clipped), below 1−ε (kept: pessimistic)
                          [0.5, -0.5, 0.1]])   # A = −1: above 1+ε (kept), below 1−ε (clipped), inside
    logps = (old + delta).requires_grad_()
    loss_sum, count, report = grpo_loss(logps, torch.ones(2, 3), torch.tensor([1.0, -1.0]), clip_eps=0.2,
                                        kl_beta=0.0, old_logps=old)
    loss_sum.backward()
    e = math.exp
    per_token = [-e(0.1), -1.2, -e(-0.5), e(0.5), 0.8, e(0.1)]
    # d(−ratio·A)/dlogp = −ratio·A where the unclipped term is the minimum; 0 where the clip is
    grads = [[-e(0.1), 0.0, -e(-0.5)], [e(0.5), 0.0, e(0.1)]]
    assert loss_sum.item() == pytest.approx(sum(per_token), rel=1e-6) and count.item() == 6
    torch.testing.assert_close(logps.grad, torch.tensor(grads))
    assert report["clip fraction"].tolist() == [2.0, 6.0]
    assert report["policy loss"][0].item() == pytest.approx(sum(per_token), rel=1e-6)
    assert report["ratio"][0].item() == pytest.approx(2 * (e(0.1) + e(0.5) + e(-0.5)), rel=1e-6)


def test_asymmetric_clip_raises_only_the_upper_bound():
    old = torch.zeros(1, 2)
    logps = torch.tensor([[0.22, -0.22]])  # ratios 1.246 (A = +1) and 0.803 (A = −1), one token per sequence
    mask = torch.ones(2, 1)
    cases = {"symmetric": None, "raised": 0.28}
    reports = {name: grpo_loss(logps.view(2, 1), mask, torch.tensor([1.0, -1.0]), 0.2, 0.0,
                               old_logps=old.view(2, 1), clip_eps_high=high)[2] for name, high in cases.items()}
    # A = +1 at 1.246: clipped by 1 + 0.2, not by 1 + 0.28; A = −1 at 0.803: inside 1 − 0.2 either way
    assert reports["symmetric"]["clip fraction"][0].item() == 1.0
    assert reports["raised"]["clip fraction"][0].item() == 0.0


def test_k3_kl_value_and_gradient_and_zero_at_the_reference():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    reference = logps.detach() + math.log(2.0)  # ref − logp = ln 2 on every token
    beta = 0.05
    loss_sum, count, report = grpo_loss(logps, torch.ones(1, 2), torch.zeros(1), 0.2, beta,
                                        reference_logps=reference)
    loss_sum.backward()
    k3 = 2.0 - math.log(2.0) - 1.0  # e^d − d − 1
    assert report["kl"].tolist() == pytest.approx([2 * k3, 2.0], rel=1e-6)
    assert loss_sum.item() == pytest.approx(2 * beta * k3, rel=1e-6)  # A = 0: the KL term alone
    torch.testing.assert_close(logps.grad, torch.full((1, 2), beta * (1.0 - 2.0)))  # β·(1 − e^d)

    logps.grad = None
    loss_sum, _, report = grpo_loss(logps, torch.ones(1, 2), torch.zeros(1), 0.2, beta,
                                    reference_logps=logps.detach())
    loss_sum.backward()
    assert report["kl"][0].item() == 0.0 and loss_sum.item() == 0.0
    assert logps.grad.abs().max().item() == 0.0


def test_kl_penalty_needs_reference_log_probs():
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1), 0.2, 0.1)


def test_tied_groups_contribute_neither_loss_nor_tokens_nor_gradient():
    """Masking by sequence_keep: a tied group's tokens leave the loss, its count and the gradient — KL included."""
    groups = GroupAdvantages(torch.tensor([1.0, 0.0, 0.3, 0.3]), group_size=2)
    logps = torch.tensor([[-1.0, -1.5], [-2.0, -0.5], [-1.0, -1.0], [-3.0, -2.0]], requires_grad=True)
    response = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    mask = response * groups.sequence_keep[:, None]
    reference = logps.detach() - 0.3
    loss_sum, count, report = grpo_loss(logps, mask, groups.advantages, 0.2, 0.1, reference_logps=reference)
    loss_sum.backward()
    assert count.item() == 3  # only the first group's response tokens
    assert logps.grad[2:].abs().max().item() == 0.0 and logps.grad[:2].abs().max().item() > 0
    kept, _, _ = grpo_loss(logps[:2], response[:2], groups.advantages[:2], 0.2, 0.1, reference_logps=reference[:2])
    assert loss_sum.item() == pytest.approx(kept.item(), rel=1e-6)


def test_token_mean_is_exact_however_the_batch_is_split():
    """The loop divides the summed loss by the summed count: two micro-batches give the one-batch token mean."""
    g = torch.Generator().manual_seed(0)
    logps, old, ref = (-torch.rand(4, 5, generator=g) * 3 for _ in range(3))
    mask = (torch.rand(4, 5, generator=g) > 0.3).int()
    advantages = torch.randn(4, generator=g)
    whole = grpo_loss(logps, mask, advantages, 0.2, 0.04, old_logps=old, reference_logps=ref)
    halves = [grpo_loss(logps[i:i + 2], mask[i:i + 2], advantages[i:i + 2], 0.2, 0.04, old_logps=old[i:i + 2],
                        reference_logps=ref[i:i + 2]) for i in (0, 2)]
    assert whole[0].item() / whole[1].item() == pytest.approx(
        sum(h[0].item() for h in halves) / sum(h[1].item() for h in halves), rel=1e-6)
    for name, value in whole[2].items():
        torch.testing.assert_close(value, halves[0][2][name] + halves[1][2][name])
