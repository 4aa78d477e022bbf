"""Per-token Quark/ALT training losses: NLL, entropy bonus and an optional KL to the reference.

Follows `docs/algorithm.md` section 6 (ALT `alt/models/policy.py:76-122`,
`alt/trainer/quark_trainer.py`, `alt/trainer/alt_trainer.py`; original Quark `main.py:240-266`) and
is checked against `tests/golden/quark_loss.json`, produced by running that code (see
`tests/golden/README.md`). Pure functions: tensors in, values out. Shapes: b = batch, t = response
tokens, v = vocabulary.

All computations run in the dtype of the logits given; pass float32 logits when precision
matters (the trainer owns that memory/precision trade-off).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLDirection = Literal["ref_policy", "policy_ref"]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """One mean over every unmasked element: sum(x * m) / sum(m).

    This is ALT's `reduce_mean` (`docs/algorithm.md` section 6.2): a single mean over all response
    tokens of the micro-batch, so long responses weigh more than short ones (not a mean of
    per-sequence means). Masked positions are selected away with `torch.where` instead of multiplied
    by 0, so inf/NaN there cannot turn the result into NaN (ALT multiplies by the mask, and 0 times
    inf is NaN). An all-zero mask gives NaN (0/0); `quark_loss` rejects that case up front.

    Args:
        x: any shape, e.g. (b, t).
        mask: same shape as x; bool or 0/1, true = counts.

    Returns:
        Scalar tensor in x's dtype; differentiable with respect to x.
    """
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != x shape {tuple(x.shape)}")
    keep = mask.bool()
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()
    return total / keep.sum().to(x.dtype)


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] over the full vocabulary (added control tokens included).

    Computed as gathered logit minus logsumexp, which avoids materialising a (b, t, v) log-softmax.

    Args:
        logits: (b, t, v), already aligned: logits[:, i] predicts labels[:, i].
        labels: (b, t) integer token ids in [0, v).

    Returns:
        (b, t) log-probabilities of the labels.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    picked = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy -sum_v p_v log p_v of softmax(logits) over the full vocabulary.

    log p comes from log_softmax (max-shifted logsumexp), so logits of +-500 or peaked
    distributions stay accurate; it is clamped to the dtype's finite minimum so that a -inf logit
    (p = 0) contributes 0 instead of 0 * -inf = NaN (same convention as
    `torch.distributions.Categorical.entropy`, which ALT uses).

    Args:
        logits: (b, t, v).

    Returns:
        (b, t) entropies in nats.
    """
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)


def token_kl(
    policy_logits: Tensor,
    ref_logits: Tensor,
    direction: KLDirection = "ref_policy",
    num_added_tokens: int = 0,
) -> Tensor:
    """Per-token KL between the policy and the frozen reference over the base vocabulary.

    The policy's last `num_added_tokens` columns (quantile tokens the reference never saw) are
    dropped BEFORE the log-softmax, i.e. q is renormalised over the v_ref base tokens
    (`docs/algorithm.md` section 6.4; golden case `quark_pol_eq_ref_plus_added` is ~0 only this
    way).

    - "ref_policy": sum_v r (log r - log q) = KL(ref || policy), ALT's direction (default).
    - "policy_ref": sum_v q (log q - log r) = KL(policy || ref), original Quark `main.py:252`.

    The reference is detached: it is a frozen model, and no gradient should reach it.

    Args:
        policy_logits: (b, t, v_policy).
        ref_logits: (b, t, v_ref) with v_ref = v_policy - num_added_tokens.
        direction: "ref_policy" or "policy_ref".
        num_added_tokens: n >= 0 added columns at the end of the policy vocabulary.

    Returns:
        (b, t) KL in nats, differentiable with respect to policy_logits only.
    """
    if num_added_tokens < 0:
        raise ValueError(f"num_added_tokens must be >= 0, got {num_added_tokens}")
    v_ref = policy_logits.shape[-1] - num_added_tokens
    if ref_logits.shape != (*policy_logits.shape[:-1], v_ref):
        raise ValueError(
            f"ref_logits shape {tuple(ref_logits.shape)} must equal policy_logits shape "
            f"{tuple(policy_logits.shape)} minus num_added_tokens={num_added_tokens} columns"
        )
    logq = torch.log_softmax(policy_logits[..., :v_ref], dim=-1)
    logr = torch.log_softmax(ref_logits.detach(), dim=-1)
    if direction == "ref_policy":
        weights, diff = logr.exp(), logr - logq
    elif direction == "policy_ref":
        weights, diff = logq.exp(), logq - logr
    else:
        raise ValueError(f"direction must be 'ref_policy' or 'policy_ref', got {direction!r}")
    # 0 * log 0 = 0 (KLDivLoss convention); a zero-probability token must not yield NaN.
    zero = torch.zeros((), dtype=diff.dtype, device=diff.device)
    return torch.where(weights > 0, weights * diff, zero).sum(-1)


def quark_loss(
    policy_logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    *,
    entropy_coef: float,
    kl_coef: float = 0.0,
    ref_logits: Tensor | None = None,
    kl_direction: KLDirection = "ref_policy",
    num_added_tokens: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """Quark/ALT objective: masked_mean(NLL_t - entropy_coef * H_t + kl_coef * KL_t).

    `docs/algorithm.md` section 6.3: the orchestrated ALT runs use kl_coef = 0 ("noKL"), alpha
    = 0.06; the KL variants use beta = 0.05 with KL(ref || policy) (ALT) or KL(policy || ref)
    (original Quark). The loss is ONE masked mean of the combined per-token quantity, which is what
    ALT back-propagates (`loss_noKL`, `loss_KL`, `loss_KL_quark_direction` in
    `tests/golden/quark_loss.json`). NLL and entropy use the full policy vocabulary, only the KL
    drops the added columns.

    Args:
        policy_logits: (b, t, v_policy), aligned so policy_logits[:, i] predicts labels[:, i].
        labels: (b, t) response token ids.
        mask: (b, t) 1 = response token (the appended EOS included), 0 = padding.
        entropy_coef: alpha, weight of the entropy bonus.
        kl_coef: beta >= 0; 0 skips the KL term (ref_logits then not needed).
        ref_logits: (b, t, v_policy - num_added_tokens), aligned the same way; if given with
            kl_coef == 0 the KL is still reported in the stats (no gradient effect).
        kl_direction: "ref_policy" (ALT) or "policy_ref" (original Quark), see `token_kl`.
        num_added_tokens: control tokens appended to the policy vocabulary.

    Returns:
        (loss, stats): scalar loss tensor with gradient, and detached floats "loss", "nll",
        "entropy", "kl" (only when ref_logits is given) and "tokens" (unmasked token count).

    Raises:
        ValueError: kl_coef < 0, kl_coef > 0 without ref_logits, mismatched shapes, or no
            unmasked token (the mean would be 0/0).
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logits is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 needs ref_logits")
    if mask.shape != labels.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match labels {tuple(labels.shape)}")
    num_tokens = int(mask.bool().sum().item())
    if num_tokens == 0:
        raise ValueError("mask selects no response token; the masked mean would be 0/0")

    # Padding may carry any id (e.g. -100); point it at id 0 so the gather stays in range.
    labels = torch.where(mask.bool(), labels, torch.zeros_like(labels))
    nll = -token_logprobs(policy_logits, labels)
    entropy = entropy_from_logits(policy_logits)
    per_token = nll - entropy_coef * entropy
    kl = None
    if ref_logits is not None:
        kl = token_kl(policy_logits, ref_logits, kl_direction, num_added_tokens)
        if kl_coef > 0:  # skipping 0 * KL keeps an infinite KL from making the loss NaN
            per_token = per_token + kl_coef * kl
    loss = masked_mean(per_token, mask)

    # One device sync for all logged numbers.
    with torch.no_grad():
        parts = [loss, masked_mean(nll, mask), masked_mean(entropy, mask)]
        if kl is not None:
            parts.append(masked_mean(kl, mask))
        values = torch.stack([p.detach().float() for p in parts]).tolist()
    stats = {"loss": values[0], "nll": values[1], "entropy": values[2]}
    if kl is not None:
        stats["kl"] = values[3]
    stats["tokens"] = float(num_tokens)
    return loss, stats
