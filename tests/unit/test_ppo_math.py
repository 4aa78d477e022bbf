"""PPO math against numbers worked out by hand (comments show the arithmetic)."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
    whiten,
)


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def gae_loop(rewards, values, gamma, lam):
    """Plain-Python GAE over one unpadded episode (the reference for the vectorised one)."""
    advantages, next_value, next_advantage = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[t], next_value = next_advantage, values[t]
    return advantages, [a + v for a, v in zip(advantages, values, strict=True)]


def test_gae_by_hand_on_one_episode():
    # r = (0, 0, 1), V = (0.5, 0.5, 0.5), gamma = 1, lam = 0.5, V after the end = 0
    # delta = (0 + 0.5 - 0.5, 0 + 0.5 - 0.5, 1 + 0 - 0.5) = (0, 0, 0.5)
    # A_2 = 0.5; A_1 = 0 + 0.5 * 0.5 = 0.25; A_0 = 0 + 0.5 * 0.25 = 0.125
    advantages, returns = gae(
        torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1.0, 0.5
    )
    assert advantages.tolist() == [[0.125, 0.25, 0.5]]
    assert returns.tolist() == [[0.625, 0.75, 1.0]]


def test_gae_matches_a_plain_loop_with_padding():
    torch.manual_seed(0)
    lengths, gamma, lam = [5, 2, 3], 0.9, 0.95
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1.0] * n + [0.0] * (5 - n) for n in lengths])
    # padding must not leak into the real tokens
    rewards_padded = torch.where(mask.bool(), rewards, torch.full_like(rewards, 99.0))
    advantages, returns = gae(rewards_padded, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        want_a, want_r = gae_loop(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert advantages[i, :n].tolist() == pytest.approx(want_a, abs=1e-6)
        assert returns[i, :n].tolist() == pytest.approx(want_r, abs=1e-6)
        assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0


def test_kl_penalized_rewards():
    # kl_coef 0.5; token log-ratios (0.2, -0.4, 0.6) and (1.0, pad): per-token -0.5 * ratio;
    # scores 20 and -3 clipped to +-10 -> 10 and -3, added at each episode's last token
    rewards = kl_penalized_rewards(
        torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -7.0, -7.0]]),
        torch.tensor([[-1.2, -1.6, -1.1], [-2.0, 5.0, 5.0]]),
        torch.tensor([20.0, -3.0]),
        torch.tensor([[1, 1, 1], [1, 0, 0]]),
        kl_coef=0.5,
        score_clip=10.0,
    )
    close(rewards, [[-0.1, 0.2, -0.3 + 10.0], [-0.5 - 3.0, 0.0, 0.0]])


def test_kl_penalized_rewards_refuses_an_empty_episode():
    with pytest.raises(ValueError, match="at least one"):
        kl_penalized_rewards(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, 2), 0.1
        )


def test_whiten_uses_only_real_tokens():
    # real values 1, 2, 3 (padding 100 ignored): mean 2, unbiased var 1 -> (-1, 0, 1)
    x = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    assert whiten(x, mask, eps=0.0).tolist() == [[-1.0, 0.0], [1.0, 0.0]]
    # shift_mean=False only rescales: (-1, 0, 1) + 2
    assert whiten(x, mask, shift_mean=False, eps=0.0).tolist() == [[1.0, 2.0], [3.0, 0.0]]
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.tensor([[1, 0], [0, 0]]))


def _ratio_logprobs(ratios):
    """Current log-probs (with grad) whose ratio to old log-probs of 0 is `ratios`."""
    return torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)


def test_policy_loss_unclipped_and_clipped():
    # eps 0.2. Token 0: ratio 1.1, A = +1 -> max(-1.1, -1.1) = -1.1, gradient -A * ratio = -1.1.
    # Token 1: ratio 1.5, A = +1 -> max(-1.5, -1.2) = -1.2, clipped: no gradient.
    # Token 2: ratio 0.5, A = -2 -> max(1.0, 1.6) = 1.6, clipped: no gradient.
    # Token 3: ratio 0.5, A = +2 -> max(-1.0, -1.6) = -1.0 (pessimistic, unclipped), grad -1.0.
    logprobs = _ratio_logprobs([1.1, 1.5, 0.5, 0.5])
    loss, stats = policy_loss(
        logprobs,
        torch.zeros(1, 4),
        torch.tensor([[1.0, 1.0, -2.0, 2.0]]),
        torch.ones(1, 4),
        cliprange=0.2,
    )
    assert loss.item() == pytest.approx((-1.1 - 1.2 + 1.6 - 1.0) / 4)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    loss.backward()
    # d/dlogp of -A * exp(logp) / 4 = -A * ratio / 4
    close(logprobs.grad, [[-1.1 / 4, 0.0, 0.0, -1.0 / 4]])
    # approx KL: mean of (r - 1) - log r
    want = sum((r - 1) - math.log(r) for r in [1.1, 1.5, 0.5, 0.5]) / 4
    assert stats["approx_kl"] == pytest.approx(want)


def test_policy_loss_ignores_masked_tokens():
    logprobs = _ratio_logprobs([1.0, 3.0])
    loss, _ = policy_loss(
        logprobs, torch.zeros(1, 2), torch.tensor([[2.0, 5.0]]), torch.tensor([[1, 0]]), 0.2
    )
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    close(logprobs.grad, [[-2.0, 0.0]])


def test_value_loss_unclipped_and_clipped():
    # eps 0.2, V_old = 0. Token 0: V 0.1, R 1 -> unclipped 0.81, clipped (0.1-1)^2 = 0.81: same,
    # gradient 2 (V - R) = -1.8. Token 1: V 0.5, R 1 -> unclipped 0.25, clipped (0.2-1)^2 = 0.64
    # wins: no gradient. Token 2: V 0.5, R 0 -> unclipped 0.25, clipped 0.04: unclipped wins,
    # gradient 2 * 0.5 = 1. Loss 0.5 * mean(0.81, 0.64, 0.25); gradients scaled by 0.5 / 3.
    values = torch.tensor([[0.1, 0.5, 0.5]], requires_grad=True)
    loss, stats = value_loss(
        values, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3), 0.2
    )
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 0.25) / 3)
    assert stats["value_clip_fraction"] == pytest.approx(1 / 3)
    loss.backward()
    close(values.grad, [[-1.8 * 0.5 / 3, 0.0, 1.0 * 0.5 / 3]])


def test_adaptive_kl_controller_by_hand():
    # KL 9 vs target 6: error 9/6 - 1 = 0.5, clipped to 0.2; 0.1 * (1 + 0.2 * 100 / 10000)
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(9.0, n_steps=100)
    assert controller.value == pytest.approx(0.1 * 1.002)
    # KL 5.4: error -0.1 -> value * (1 - 0.1 * 1000 / 10000) = value * 0.99
    before = controller.value
    controller.update(5.4, n_steps=1000)
    assert controller.value == pytest.approx(before * 0.99)
    # KL at target: no change
    controller.update(6.0, n_steps=1000)
    assert controller.value == pytest.approx(before * 0.99)


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=10_000)
    assert controller.value == 0.05
