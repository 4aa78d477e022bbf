"""Reward quantiles: which control token each generation is trained under.

Quark/ALT rank generations by reward and split the ranking into K equal buckets; bucket 0 (the
highest rewards) becomes the "best" control token used at sampling time. ALT buckets the samples
of each prompt on their own ("prompt" scope), original Quark buckets one global pool ("global"
scope); see `docs/algorithm.md` section 3. Both use the same rule, implemented once in
`assign_quantiles`; golden vectors from ALT's code: `tests/golden/quantiles.json`.

Pure Python on purpose: rewards are compared as Python floats (float64), because storing them as
float32 merges distinct rewards into ties and changes the buckets (golden case
`len6_Q3_float32_collision`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

log = logging.getLogger(__name__)

QuantileScope = Literal["prompt", "global"]

_warned_too_few: set[int] = set()
"""The K values already warned about: a run re-buckets every iteration, and one line suffices."""


def _warn_if_too_few(sizes: Sequence[int], num_quantiles: int, scope: str) -> None:
    """Say (once per K) when some group has fewer rewards than buckets: ALT's rule then puts
    every one of them in the worst bucket, which silently teaches the model nothing."""
    small = [m for m in sizes if 0 < m < num_quantiles]
    if not small or num_quantiles in _warned_too_few:
        return
    _warned_too_few.add(num_quantiles)
    where = "prompt(s)" if scope == "prompt" else "global pool(s)"
    log.warning(
        "%d %s have fewer usable rewards (as few as %d) than the %d quantiles: all of their "
        "generations go to the worst quantile %d; draw at least %d samples per prompt",
        len(small),
        where,
        min(small),
        num_quantiles,
        num_quantiles - 1,
        num_quantiles,
    )


def assign_quantiles(rewards: Sequence[float | None], num_quantiles: int) -> list[int | None]:
    """Bucket one group of rewards into quantile indices, 0 = best, exactly as ALT does.

    Rule (ALT `alt/data_pool.py:81-101`, `docs/algorithm.md` section 3.1):
      1. drop missing rewards: None, and also NaN/inf (a scorer failure must not be ranked;
         ALT only drops None);
      2. stable sort of the m kept items by reward, descending, so equal rewards keep generation
         order and the earlier generation gets the better rank (-0.0 ties 0.0);
      3. b = floor(m / K); ranks [k*b, (k+1)*b) get quantile k;
      4. the remainder (ranks >= K*b) goes to the worst quantile K-1.

    Consequences kept on purpose because ALT has them (`tests/golden/quantiles.json`, and
    `docs/algorithm.md` section 15 item 3): with m < K, b = 0 and every item is labelled K-1 (too
    few samples to rank meaningfully, so none is declared "best"); with m = 96, K = 5 the sizes are
    19/19/19/19/20.

    Deliberate difference: with no usable reward (m == 0, including an empty group) ALT raises and
    the whole pool update fails; here the group is skipped, i.e. every entry is None, so one
    prompt whose scoring failed does not abort the iteration.

    Args:
        rewards: length n, the reward of generation j at position j; None/NaN/inf = missing.
        num_quantiles: K >= 1.

    Returns:
        Length n, in the original generation order: the quantile index in [0, K) of each
        generation, or None where its reward is missing.

    Raises:
        ValueError: if num_quantiles < 1.
    """
    if num_quantiles < 1:
        raise ValueError(f"num_quantiles must be >= 1, got {num_quantiles}")
    # Python floats (float64): -0.0 == 0.0, and no float32 merging of close rewards.
    kept = {j: float(r) for j, r in enumerate(rewards) if r is not None and math.isfinite(r)}
    # sorted() is stable also with reverse=True: ties keep generation order.
    ranked = sorted(kept, key=kept.__getitem__, reverse=True)
    bucket_size = len(ranked) // num_quantiles
    worst = num_quantiles - 1
    out: list[int | None] = [None] * len(rewards)
    for rank, j in enumerate(ranked):
        # bucket_size == 0 (m < K) sends everything to the worst bucket, like the reference.
        out[j] = min(rank // bucket_size, worst) if bucket_size else worst
    return out


def _usable(rewards: Sequence[float | None]) -> int:
    return sum(1 for r in rewards if r is not None and math.isfinite(r))


def assign_quantiles_global(
    groups: Sequence[Sequence[float | None]], num_quantiles: int
) -> list[list[int | None]]:
    """Original-Quark global scope: one ranking over all groups, split back per group.

    Quark keeps a single pool over every prompt and re-buckets it as a whole (Quark
    `data_pool.py:13-26`, `docs/algorithm.md` section 3.2), so a prompt that is easy for the model
    lands mostly in the good buckets. The rule is `assign_quantiles` applied to the concatenation of
    the groups in order; ties across groups go to the earlier group.

    Args:
        groups: g groups of rewards (n_i each); None/NaN/inf = missing.
        num_quantiles: K >= 1.

    Returns:
        g lists shaped like `groups`, with quantile indices (0 = best) or None.
    """
    flat = [r for group in groups for r in group]
    flat_quantiles = assign_quantiles(flat, num_quantiles)
    out: list[list[int | None]] = []
    start = 0
    for group in groups:
        out.append(flat_quantiles[start : start + len(group)])
        start += len(group)
    return out


def assign_quantiles_scoped(
    groups: Sequence[Sequence[float | None]],
    num_quantiles: int,
    scope: QuantileScope,
) -> list[list[int | None]]:
    """Bucket per prompt ("prompt", ALT, the default of the reproduction) or over all ("global").

    One entry point so the CLI and the trainer only pass the configured scope; the ALT-Quark model
    card reports that per-prompt quantiles were crucial compared with Quark's global ones
    (`docs/algorithm.md` section 3.2).

    Args:
        groups: g groups of rewards (n_i each), one group per prompt.
        num_quantiles: K >= 1.
        scope: "prompt" or "global".

    Returns:
        g lists shaped like `groups`, with quantile indices (0 = best) or None.

    Raises:
        ValueError: if the scope is unknown or num_quantiles < 1.
    """
    if scope == "prompt":
        if num_quantiles < 1:  # checked here too, so that zero groups still fail loudly
            raise ValueError(f"num_quantiles must be >= 1, got {num_quantiles}")
        _warn_if_too_few([_usable(g) for g in groups], num_quantiles, scope)
        return [assign_quantiles(group, num_quantiles) for group in groups]
    if scope == "global":
        out = assign_quantiles_global(groups, num_quantiles)
        _warn_if_too_few([sum(_usable(g) for g in groups)], num_quantiles, scope)
        return out
    raise ValueError(f"scope must be 'prompt' or 'global', got {scope!r}")
