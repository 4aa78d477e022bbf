"""Statistics for comparing policies on the same prompts, with the prompt as the unit.

The K samples of one prompt share the prompt and are not independent, so every standard error
here is taken over prompts: first a per-prompt summary (the mean of its K rewards, or the fraction
of its K generations that beat the human summary), then mean and SE (ddof = 1) over prompts.
Two policies evaluated on the same prompts are compared *paired*: the SE is that of the per-prompt
differences, which removes the prompt-to-prompt spread both policies share.

Pure functions: values in, values out. Missing values (None, NaN, inf) are skipped, as in
`alignment.metrics`; a prompt with no usable value is None and drops out of every summary (and
of a pair, with its partner).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from alignment.metrics import _finite, mean_and_stderr

TIE_TOLERANCE = 1e-12


def per_prompt_means(
    rewards: Sequence[float | None], samples_per_prompt: int
) -> list[float | None]:
    """The mean of each prompt's rewards; `rewards` is prompt-major, `samples_per_prompt` each.

    A prompt whose rewards are all missing gives None.

    Raises:
        ValueError: if samples_per_prompt < 1 or len(rewards) is not a multiple of it.
    """
    k = samples_per_prompt
    if k < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {k}")
    if len(rewards) % k:
        raise ValueError(f"{len(rewards)} rewards are not a multiple of {k} samples per prompt")
    means: list[float | None] = []
    for start in range(0, len(rewards), k):
        kept = [v for v in map(_finite, rewards[start : start + k]) if v is not None]
        means.append(math.fsum(kept) / len(kept) if kept else None)
    return means


@dataclass(frozen=True)
class PairedDifference:
    """`treatment - baseline` over the prompts where both have a value.

    mean +- stderr of the per-prompt differences (ddof = 1; NaN with fewer than 2 pairs); wins /
    ties / losses count prompts where the treatment is above / within TIE_TOLERANCE of / below
    the baseline.
    """

    mean: float
    stderr: float
    n: int
    wins: int
    ties: int
    losses: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def paired_difference(
    baseline: Sequence[float | None], treatment: Sequence[float | None]
) -> PairedDifference:
    """Paired comparison of two per-prompt summaries of the same prompts, in the same order.

    Raises:
        ValueError: if the two sequences differ in length.
    """
    if len(baseline) != len(treatment):
        raise ValueError(f"{len(baseline)} baseline prompts but {len(treatment)} to compare")
    diffs = []
    for a, b in zip(map(_finite, baseline), map(_finite, treatment), strict=True):
        if a is not None and b is not None:
            diffs.append(b - a)
    mean, stderr = mean_and_stderr(diffs)
    ties = sum(abs(d) <= TIE_TOLERANCE for d in diffs)
    wins = sum(d > TIE_TOLERANCE for d in diffs)
    return PairedDifference(mean, stderr, len(diffs), wins, ties, len(diffs) - wins - ties)


def win_fractions(
    rewards: Sequence[float | None],
    reference_rewards: Sequence[float | None],
    samples_per_prompt: int,
) -> list[float | None]:
    """Per prompt, the fraction of its generations whose reward beats the reference's (ties: 1/2).

    `rewards` is prompt-major (`samples_per_prompt` each), `reference_rewards` one per prompt
    (e.g. the human summary's). Missing generation rewards are skipped; a prompt whose reference
    reward is missing, or with no usable generation reward, gives None.

    Raises:
        ValueError: on mismatched lengths.
    """
    k = samples_per_prompt
    if k < 1 or len(rewards) != k * len(reference_rewards):
        raise ValueError(
            f"{len(rewards)} rewards do not match {len(reference_rewards)} prompts x {k} samples"
        )
    fractions: list[float | None] = []
    for i, ref in enumerate(map(_finite, reference_rewards)):
        kept = [v for v in map(_finite, rewards[i * k : (i + 1) * k]) if v is not None]
        if ref is None or not kept:
            fractions.append(None)
            continue
        score = sum(1.0 if v > ref else 0.5 if abs(v - ref) <= TIE_TOLERANCE else 0.0 for v in kept)
        fractions.append(score / len(kept))
    return fractions


def prompt_level_summary(per_prompt: Sequence[float | None]) -> dict[str, float | int]:
    """{mean, stderr, n} over prompts of a per-prompt summary (missing prompts skipped)."""
    mean, stderr = mean_and_stderr(per_prompt)
    return {"mean": mean, "stderr": stderr, "n": sum(_finite(v) is not None for v in per_prompt)}


def conditioning_curve(
    controls: Sequence[str],
    rewards_by_control: Sequence[Sequence[float | None]],
    samples_per_prompt: int,
) -> dict:
    """Held-out reward under each control, and best minus worst paired by prompt.

    A policy that learned its conditioning scores higher under `controls[0]` (best) than under
    `controls[-1]` (worst) on the same prompts; a flat curve means the controls are ignored.

    Args:
        controls: the control strings, best first.
        rewards_by_control: per control, the rewards of its generations, prompt-major with
            `samples_per_prompt` each, the same prompts in the same order for every control.
        samples_per_prompt: generations per prompt.

    Returns:
        {"controls": [{quantile, control, reward_mean, reward_stderr, per_prompt_reward}],
        "best_minus_worst": PairedDifference.to_dict()}, the mean and SE over prompts.

    Raises:
        ValueError: if there is not one reward list per control, or on mismatched lengths.
    """
    if not controls or len(controls) != len(rewards_by_control):
        raise ValueError(f"{len(rewards_by_control)} reward lists for {len(controls)} controls")
    per_control = []
    for q, (control, rewards) in enumerate(zip(controls, rewards_by_control, strict=True)):
        means = per_prompt_means(rewards, samples_per_prompt)
        summary = prompt_level_summary(means)
        per_control.append(
            {
                "quantile": q,
                "control": control,
                "reward_mean": summary["mean"],
                "reward_stderr": summary["stderr"],
                "per_prompt_reward": means,
            }
        )
    best, worst = per_control[0]["per_prompt_reward"], per_control[-1]["per_prompt_reward"]
    return {
        "controls": per_control,
        "best_minus_worst": paired_difference(worst, best).to_dict(),
    }
