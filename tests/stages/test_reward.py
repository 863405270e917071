"""Reward model: the scalar head reads the last answer token, the Bradley-Terry loss, trunk init from an LM
checkpoint, and learning to rank the corpus' correct answers above wrong ones."""

import pytest
import torch

from tests.harness import post_training_data as data

from tinyllm_mcore.stages import reward


def test_last_token_and_loss():
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    assert reward.last_token_index(mask).tolist() == [3, 4, 2, 4]
    values = torch.arange(20, dtype=torch.float32).view(4, 5)
    loss_sum, count, reports = reward.reward_loss(mask, values)
    r = torch.tensor([[3.0, 9.0], [12.0, 19.0]])
    expected = -torch.nn.functional.logsigmoid(r[:, 0] - r[:, 1]).sum()
    torch.testing.assert_close(loss_sum, expected)
    assert int(count) == 2 and reports["reward accuracy"][0].item() == 0
    with pytest.raises(ValueError, match="no answer tokens"):
        reward.last_token_index(torch.zeros(2, 5))


def test_reward_model_learns_preferences_from_sft_trunk(tmp_path):
    stage = reward.make_stage(data.preference_provider(data.corpus().preference))
    result = data.run_stage(stage, data.common_flags(
        tmp_path, "--train-iters", "60", "--micro-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-4",
        "--init-from", str(data.checkpoints()["sft"]), "--save", str(tmp_path / "rm"), "--log-interval", "10"))
    train = [r for r in result["history"] if r["split"] == "train"]
    first = sum(r["reward accuracy"] for r in train[:5]) / 5
    last = sum(r["reward accuracy"] for r in train[-5:]) / 5
    assert last > 0.8 and last > first
    assert train[-1]["reward loss"] < train[0]["reward loss"]
    # the saved reward model reloads (head included) and continues
    again = data.run_stage(stage, data.common_flags(
        tmp_path, "--train-iters", "61", "--micro-batch-size", "8", "--load", str(tmp_path / "rm")))
    assert again["history"][0]["iteration"] == 61
