"""PPO's math for language models: KL-shaped rewards, GAE, whitening, the clipped losses, and the
KL-coefficient controllers. Pure functions on tensors; the algorithm that runs them is
`alignment/algorithms/ppo.py`.

Follows trlx's TL;DR PPO (`docs/algorithm.md` section 14; trlx `trlx/models/modeling_ppo.py`,
`trlx/trainer/accelerate_ppo_trainer.py`) and Ziegler et al. 2019, "Fine-Tuning Language Models
from Human Preferences" (arXiv 1909.08593) for the adaptive KL controller.

Shapes: b = episodes (prompt + generation), t = generated tokens. Every (b, t) tensor is
right-padded: `mask[i, :n_i]` is 1 on episode i's n_i generated tokens, 0 after them. Action t
is generated token t; its value is V(prompt + tokens before t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignment.losses import masked_mean


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the unmasked entries; masked entries become 0.

    trlx whitens the advantages this way (`whiten` in `trlx/utils/modeling.py`), but over a
    padded minibatch with its padding included; the statistics here use only real tokens, with
    Bessel's correction as `torch.var_mean`. `shift_mean=False` keeps the mean (only rescales), as
    trlx does for rewards.

    Args:
        x: (b, t).
        mask: (b, t), 1 = counts; at least 2 unmasked entries.

    Returns:
        (b, t) whitened x.
    """
    keep = mask.bool()
    n = int(keep.sum())
    if n < 2:
        raise ValueError(f"whitening needs at least 2 unmasked entries, got {n}")
    mean = masked_mean(x, keep)
    var = torch.where(keep, (x - mean) ** 2, torch.zeros_like(x)).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, torch.zeros_like(out))


def kl_penalized_rewards(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    scores: Tensor,
    mask: Tensor,
    kl_coef: float,
    score_clip: float | None = None,
) -> Tensor:
    """Per-token rewards: `-kl_coef * (logprob - ref_logprob)` on every generated token, plus the
    sequence's score (clipped to +-score_clip) on its last generated token.

    trlx `make_experience`: the score is clipped by `cliprange_reward` and added at the last
    response token; the KL term is the single-sample estimate of KL(policy || ref) at each token.

    Args:
        logprobs: (b, t) log p_policy of the generated tokens at sampling time.
        ref_logprobs: (b, t) log p_ref of the same tokens.
        scores: (b,) reward-model scores.
        mask: (b, t) right-padded, every row with at least one token.
        kl_coef: beta >= 0.
        score_clip: clip the scores to [-score_clip, score_clip]; None: no clipping.

    Returns:
        (b, t) rewards, 0 on padding.
    """
    keep = mask.bool()
    lengths = keep.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("every episode needs at least one generated token")
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    rewards = torch.where(keep, -kl_coef * (logprobs - ref_logprobs), torch.zeros_like(logprobs))
    last = (lengths - 1).unsqueeze(-1)
    return rewards.scatter_add(-1, last, scores.to(rewards.dtype).unsqueeze(-1))


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv 1506.02438).

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last token (the episode ends
    there); A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V_t, the value targets.
    Same recursion as trlx `get_advantages_and_returns`, with padding masked out instead of
    assumed zero.

    Args:
        rewards: (b, t) per-token rewards (`kl_penalized_rewards`).
        values: (b, t) V_t from the rollout.
        mask: (b, t) right-padded.
        gamma: discount; lam: GAE lambda.

    Returns:
        (advantages, returns), both (b, t), 0 on padding, without gradient.
    """
    keep = mask.to(rewards.dtype)
    rewards, values = (rewards * keep).detach(), (values * keep).detach()
    t = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        advantages[:, i] = (delta + gamma * lam * next_advantage) * keep[:, i]
        next_value, next_advantage = values[:, i], advantages[:, i]
    return advantages, (advantages + values) * keep


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate: masked mean of max(-A * ratio, -A * clip(ratio, 1 +- eps)).

    Schulman et al. 2017 (arXiv 1707.06347) eq. 7, as trlx `PPOConfig.loss`. Where the clipped
    term wins, the loss is constant in `logprobs` and that token gives no gradient.

    Args:
        logprobs: (b, t) log p of the generated tokens under the current policy (with grad).
        old_logprobs: (b, t) the same at rollout time.
        advantages: (b, t).
        mask: (b, t).
        cliprange: eps > 0.

    Returns:
        (loss, stats): stats "policy_loss", "clip_fraction" (tokens where clipping won) and
        "approx_kl" (masked mean of (ratio - 1) - log ratio, the k3 estimate of
        KL(old || new)).
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = log_ratio.exp()
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    return loss, {
        "policy_loss": float(loss.detach()),
        "clip_fraction": float(clip_fraction),
        "approx_kl": float(approx_kl),
    }


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- eps) - R)^2).

    As trlx `PPOConfig.loss`: the new value may move at most `cliprange_value` from the rollout's
    value before the clipped error takes over (and its gradient stops).

    Args:
        values: (b, t) V under the current value head (with grad).
        old_values: (b, t) V at rollout time.
        returns: (b, t) targets from `gae`.
        mask: (b, t).
        cliprange_value: eps > 0.

    Returns:
        (loss, stats): stats "value_loss" and "value_clip_fraction".
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, {"value_loss": float(loss.detach()), "value_clip_fraction": float(clip_fraction)}


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current: float, n_steps: int) -> None:
        """Nothing to adapt."""


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019, section 2.2: steer the measured KL towards `target`.

    After each batch of `n_steps` episodes with measured KL `current`:
    e = clip(current / target - 1, -0.2, 0.2); value *= 1 + e * n_steps / horizon.
    """

    value: float
    target: float
    horizon: int

    def update(self, current: float, n_steps: int) -> None:
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
