"""Best-of-N: the reward and the KL of "draw N, keep the reward model's best", from one pool.

One pool of M generations per prompt serves every N <= M. Drawing a pool per N would cost
sum(N) samples per prompt and give each N independent noise; the order-statistics estimates below
reuse the same M samples, so the curve over N is smooth and monotone.

Pure functions: values in, values out. Rewards that are missing (None, NaN, inf) are dropped
first, with their generations; a prompt with fewer than N usable rewards gives None for that N
and drops out of the prompt-level summary (as in `alignment.comparison`).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

from alignment.comparison import prompt_level_summary
from alignment.metrics import _finite, mean_and_stderr


def expected_best_of_n(rewards: Sequence[float], n: int) -> float:
    """E[max of n draws without replacement from the M rewards]: the best-of-n reward.

    Averaged over all C(M, n) subsets of the pool, this is a U-statistic, an unbiased estimate of
    the expected best of n i.i.d. samples of the policy. With r sorted ascending, the i-th
    smallest (1-based) is the maximum of C(i-1, n-1) of the subsets:
    E[max] = sum_i r_(i) * C(i-1, n-1) / C(M, n). Ties need nothing special (equal values).

    Raises:
        ValueError: unless 1 <= n <= M.
    """
    m = len(rewards)
    if not 1 <= n <= m:
        raise ValueError(f"best of {n} needs 1 <= n <= {m} samples")
    subsets = math.comb(m, n)
    return math.fsum(r * (math.comb(i, n - 1) / subsets) for i, r in enumerate(sorted(rewards)))


def best_of_n_probabilities(rewards: Sequence[float], n: int) -> list[float]:
    """The mass best-of-n puts on each sample of the pool, for n draws from its empirical law.

    Drawing n times with replacement from the M samples and keeping the best, the i-th smallest
    reward (1-based) wins with probability (i/M)^n - ((i-1)/M)^n. Tied rewards are one rank
    range: it gets the mass of its ranks, shared equally (the best-of-n policy breaks ties at
    random). n = 1 gives 1/M each.

    Raises:
        ValueError: unless n >= 1 and the pool is not empty.
    """
    m = len(rewards)
    if n < 1 or m == 0:
        raise ValueError(f"best of {n} of {m} samples: need n >= 1 and a sample")
    order = sorted(range(m), key=lambda j: rewards[j])
    probs = [0.0] * m
    below = 0
    for _, group in itertools.groupby(order, key=lambda j: rewards[j]):
        tied = list(group)
        mass = ((below + len(tied)) / m) ** n - (below / m) ** n
        for j in tied:
            probs[j] = mass / len(tied)
        below += len(tied)
    return probs


def best_of_n_kl(
    rewards: Sequence[float], n: int, texts: Sequence[Hashable] | None = None
) -> float:
    """KL(best-of-n || policy), estimated on the pool: sum_x p(x) log(p(x) / q(x)).

    q is the empirical law of the M samples and p what best-of-n makes of it
    (`best_of_n_probabilities`); identical `texts` are one outcome, their masses added before
    the log. Without ties this is sum_i p_i log(M p_i). How it relates to the analytic
    `kl_bound(n)` = log n - (n-1)/n: the bound holds for any base distribution and is reached by
    a continuous one. With M distinct samples and rewards the estimate depends on M and n alone
    (a finite-M version of the bound, below it: 1.163 against 1.204 for M = n = 8, tending to it
    as M grows); tied rewards and repeated texts lower it, down to 0 for a policy that always
    writes the same text. So it tells how far a peaked policy's best-of-n stays from the bound,
    not more. n = 1 gives 0.
    """
    probs = best_of_n_probabilities(rewards, n)
    keys: Sequence[Hashable] = range(len(probs)) if texts is None else texts
    if len(keys) != len(probs):
        raise ValueError(f"{len(keys)} texts for {len(probs)} rewards")
    p: dict[Hashable, float] = defaultdict(float)
    q: dict[Hashable, float] = defaultdict(float)
    for key, prob in zip(keys, probs, strict=True):
        p[key] += prob
        q[key] += 1 / len(probs)
    return max(0.0, math.fsum(p[k] * math.log(p[k] / q[k]) for k in p if p[k] > 0))


def kl_bound(n: int) -> float:
    """log n - (n-1)/n: the KL of best-of-n to the policy for a continuous reward, and an upper
    bound for any (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment
    policy")."""
    return math.log(n) - (n - 1) / n


def summarize_best_of_n(
    rewards: Sequence[float | None],
    texts: Sequence[str],
    samples_per_prompt: int,
    ns: Sequence[int],
) -> list[dict]:
    """One row per n (ascending) from a pool of `samples_per_prompt` generations per prompt.

    `rewards` and `texts` are prompt-major. Each row: `n`, the prompt-level `reward_mean` +-
    `reward_stderr` of the expected best-of-n reward over `reward_prompts` prompts, `kl_bound`,
    `kl_estimate` +- `kl_estimate_stderr` (mean over prompts), `samples` (what best-of-n itself
    costs: n x prompts) and `per_prompt_reward`.

    Raises:
        ValueError: if an n is outside 1..samples_per_prompt, or the lengths do not fit.
    """
    m = samples_per_prompt
    if m < 1 or len(rewards) != len(texts) or len(rewards) % m:
        raise ValueError(f"{len(rewards)} rewards, {len(texts)} texts: not a pool of {m} each")
    if not all(1 <= n <= m for n in ns):
        raise ValueError(f"best-of-n needs every n in 1..{m} (the pool), got {list(ns)}")
    pools = []
    for start in range(0, len(rewards), m):
        kept = [
            (value, text)
            for value, text in zip(
                map(_finite, rewards[start : start + m]), texts[start : start + m], strict=True
            )
            if value is not None
        ]
        pools.append(([v for v, _ in kept], [t for _, t in kept]))
    rows = []
    for n in sorted(ns):
        usable = [len(values) >= n for values, _ in pools]
        best = [
            expected_best_of_n(values, n) if ok else None
            for (values, _), ok in zip(pools, usable, strict=True)
        ]
        kl = [
            best_of_n_kl(values, n, pool_texts) if ok else None
            for (values, pool_texts), ok in zip(pools, usable, strict=True)
        ]
        summary = prompt_level_summary(best)
        kl_mean, kl_stderr = mean_and_stderr(kl)
        rows.append(
            {
                "n": n,
                "reward_mean": summary["mean"],
                "reward_stderr": summary["stderr"],
                "reward_prompts": summary["n"],
                "kl_bound": kl_bound(n),
                "kl_estimate": kl_mean,
                "kl_estimate_stderr": kl_stderr,
                "samples": n * len(pools),
                "per_prompt_reward": best,
            }
        )
    return rows
