"""Evaluation metrics: reward summaries, perplexity under the reference, KL estimate, dist-n.

Follows ALT's evaluation, `docs/algorithm.md` section 9 (ALT `alt/perplexity.py:52-111`,
`alt/utils/utils.py:182-194`). Pure functions: values or tensors in, values out; no I/O, no logging,
no distributed calls (the caller gathers across processes first). Shapes: b = batch, t = response
tokens.

Missing values (None, NaN, inf) are skipped in the list summaries, the same convention as
`quantiles.assign_quantiles`: a scorer failure is not a reward of zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def _finite(x: object) -> float | None:
    """x as a float if it is a finite real number, else None (None, NaN, inf, non-numbers)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def mean_and_stderr(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and standard error of the mean, so eval curves can show how noisy each point is.

    stderr = sample std (ddof = 1) / sqrt(n). None, NaN and inf entries are dropped first (a
    missing reward must not count as 0 or poison the mean with NaN); n is the number kept.
    With n < 2 the spread is unknown, so stderr is NaN rather than a misleading 0.0; with n = 0
    the mean is NaN as well.

    Args:
        values: length n, e.g. per-sample rewards.

    Returns:
        (mean, stderr) as Python floats.
    """
    kept = [v for v in map(_finite, values) if v is not None]
    n = len(kept)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(kept) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((v - mean) ** 2 for v in kept) / (n - 1)
    return mean, math.sqrt(var / n)


def _check_mask(name: str, x: Tensor, mask: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be (b, t), got shape {tuple(x.shape)}")
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != {name} shape {tuple(x.shape)}")


def _masked_row_sum(x: Tensor, keep: Tensor) -> Tensor:
    # torch.where, not x * mask: padding may hold -inf logprobs, and -inf * 0 = NaN.
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)


def _metric_dtype(x: Tensor) -> torch.dtype:
    # At least float32: half-precision sums over 64+ tokens lose digits that exp() amplifies.
    return torch.promote_types(x.dtype, torch.float32)


def per_sample_perplexity(token_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Perplexity of each generation under the model that produced `token_logprobs`.

    PPL_i = exp(-(1/T_i) * sum_t mask_it * logp_it), with T_i the number of unmasked tokens of row i
    (`docs/algorithm.md` section 9, ALT `alt/perplexity.py`). Used with the SFT reference's logprobs
    of the policy's generations, it measures how far the policy's text drifts from the reference. A
    row with no tokens (T_i = 0, e.g. an empty generation) gives NaN: it has no perplexity.

    Args:
        token_logprobs: (b, t) log p(y_t | x, y_<t) of each generated token.
        mask: (b, t) bool or 0/1, true = a generated token (not prompt, not padding).

    Returns:
        (b,) per-sample perplexities, in at least float32.
    """
    _check_mask("token_logprobs", token_logprobs, mask)
    logprobs = token_logprobs.to(_metric_dtype(token_logprobs))
    keep = mask.bool()
    counts = keep.sum(-1)
    mean_nll = -_masked_row_sum(logprobs, keep) / counts.clamp_min(1).to(logprobs.dtype)
    ppl = torch.exp(mean_nll)
    return torch.where(counts > 0, ppl, torch.full_like(ppl, math.nan))


def mean_perplexity(perplexities: Tensor) -> float:
    """The mean of per-sample perplexities, ignoring NaN rows: the number ALT reports.

    This is nanmean_i PPL_i (`docs/algorithm.md` section 9), not a corpus perplexity exp(total NLL /
    total tokens): each generation weighs the same regardless of its length, and one badly modelled
    generation can dominate. Kept that way so numbers compare with ALT's. NaN if no row has tokens.
    Original Quark also drops values >= 1e4 before averaging; ALT does not, nor do we.

    It takes the per-sample values rather than logprobs so that processes can each compute
    theirs and one mean covers them all.

    Args:
        perplexities: (b,) from `per_sample_perplexity` (NaN: a row without tokens).

    Returns:
        A Python float.
    """
    if perplexities.dim() != 1:
        raise ValueError(f"perplexities must be (b,), got shape {tuple(perplexities.shape)}")
    return float(torch.nanmean(perplexities).item())


def sequence_kl_estimate(policy_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence Monte Carlo estimate of KL(policy || ref), to see how far training moved.

    For y ~ policy, sum_t (log p_policy(y_t | .) - log p_ref(y_t | .)) = log p_policy(y) -
    log p_ref(y), whose expectation over y is KL(policy || ref) of the whole sequence. Each
    single value can be negative; only the mean over samples estimates KL. It is unbiased only
    when y was *sampled* from the policy with the same temperature/top-p that `policy_logprobs`
    describe; for greedy (or otherwise truncated) outputs it is not a KL estimate, only a
    log-likelihood ratio. A row with no tokens gives 0 (empty sum).

    Args:
        policy_logprobs: (b, t) log p_policy of the generated tokens.
        ref_logprobs: (b, t) log p_ref of the same tokens in the same context (prompt without the
            control prefix, as the reference was never trained with one).
        mask: (b, t) bool or 0/1, true = a generated token.

    Returns:
        (b,) log-ratio sums in nats, in at least float32.
    """
    _check_mask("policy_logprobs", policy_logprobs, mask)
    _check_mask("ref_logprobs", ref_logprobs, mask)
    dtype = torch.promote_types(_metric_dtype(policy_logprobs), ref_logprobs.dtype)
    diff = policy_logprobs.to(dtype) - ref_logprobs.to(dtype)
    return _masked_row_sum(diff, mask.bool())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """dist-n: unique n-grams / total n-grams, pooled over all texts, as a diversity score.

    Words are whitespace-split (`str.split()`); n-grams do not span two texts. The set of unique
    n-grams and the total count are pooled over all texts (corpus-level, as in ALT), not averaged
    per text.

    Deliberate difference: ALT (`alt/utils/utils.py:182-194`) divides by the total number of
    *words* W. For n > 1 a text of w words has only w - n + 1 n-grams, so ALT's value is ours
    times (total n-grams / W): a set of texts without any repeated n-gram scores below 1, the
    more so the shorter the texts. We divide by the total number of *n-grams*, so the value is a
    fraction in [0, 1] with 1 = no repeated n-gram. Compare with ALT numbers only for n = 1,
    where both definitions agree.

    Args:
        texts: generations.
        n: n-gram order, >= 1.

    Returns:
        A float in [0, 1]; 0.0 when there is no n-gram at all (every text shorter than n words).

    Raises:
        ValueError: if n < 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unique: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        unique.update(grams)
        total += len(grams)
    return len(unique) / total if total else 0.0


def summarize_rewards_by_quantile(
    rewards: Sequence[float | None], quantiles: Sequence[int | None]
) -> dict[int, float]:
    """Mean reward of the samples in each quantile, to check that the buckets are ordered.

    Pairs whose reward is missing (None/NaN/inf) or whose quantile is None (unranked) are
    skipped. A quantile with no kept sample does not appear in the result.

    Args:
        rewards: length n, reward of sample j.
        quantiles: length n, quantile index of sample j (0 = best).

    Returns:
        {quantile: mean reward}, keys in increasing order.

    Raises:
        ValueError: if the two sequences differ in length.
    """
    if len(rewards) != len(quantiles):
        raise ValueError(f"{len(rewards)} rewards but {len(quantiles)} quantiles")
    groups: dict[int, list[float]] = {}
    for reward, quantile in zip(rewards, quantiles, strict=True):
        value = _finite(reward)
        if quantile is None or value is None:
            continue
        groups.setdefault(int(quantile), []).append(value)
    return {q: math.fsum(groups[q]) / len(groups[q]) for q in sorted(groups)}
