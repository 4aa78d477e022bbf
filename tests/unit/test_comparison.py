"""alignment/comparison.py against hand computations on tiny fixed examples."""

from __future__ import annotations

import math

import pytest

from alignment.comparison import (
    conditioning_curve,
    paired_difference,
    per_prompt_means,
    prompt_level_summary,
    win_fractions,
)


def test_per_prompt_means_by_hand():
    rewards = [0.0, 0.2, 1.0, 0.0, 0.3, 0.3]
    assert per_prompt_means(rewards, 2) == pytest.approx([0.1, 0.5, 0.3])
    # a missing reward is skipped, a prompt with none left is None
    assert per_prompt_means([1.0, None, math.nan, math.inf], 2) == [1.0, None]
    with pytest.raises(ValueError, match="multiple"):
        per_prompt_means([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match=">= 1"):
        per_prompt_means([1.0], 0)


def test_paired_difference_by_hand():
    # differences [0.1, -0.1, 0.6]: mean 0.2; deviations [-0.1, -0.3, 0.4], sum of squares 0.26,
    # variance (ddof=1) 0.13, SE sqrt(0.13 / 3) = 0.2081666
    diff = paired_difference([0.1, 0.5, 0.3], [0.2, 0.4, 0.9])
    assert diff.mean == pytest.approx(0.2)
    assert diff.stderr == pytest.approx(math.sqrt(0.13 / 3))
    assert diff.stderr == pytest.approx(0.2081666, abs=1e-7)
    assert (diff.n, diff.wins, diff.ties, diff.losses) == (3, 2, 0, 1)
    assert diff.to_dict() == {
        "mean": diff.mean,
        "stderr": diff.stderr,
        "n": 3,
        "wins": 2,
        "ties": 0,
        "losses": 1,
    }


def test_paired_difference_is_not_the_se_of_each_mean():
    # a shared prompt effect: each mean has a large SE, the paired difference none
    base = [0.0, 10.0, 20.0]
    diff = paired_difference(base, [b + 1.0 for b in base])
    assert diff.mean == pytest.approx(1.0)
    assert diff.stderr == pytest.approx(0.0, abs=1e-12)
    assert (diff.wins, diff.ties, diff.losses) == (3, 0, 0)


def test_paired_difference_ties_and_missing():
    diff = paired_difference([0.3, None, 0.5, 1.0], [0.3 + 1e-13, 2.0, 0.5, 0.0])
    assert (diff.n, diff.wins, diff.ties, diff.losses) == (3, 0, 2, 1)
    same = paired_difference([0.1, 0.5], [0.1, 0.5])
    assert (same.mean, same.stderr, same.ties) == (0.0, 0.0, 2)
    one = paired_difference([0.1], [0.3])
    assert one.mean == pytest.approx(0.2) and math.isnan(one.stderr)
    with pytest.raises(ValueError, match="differ|compare"):
        paired_difference([0.1], [0.1, 0.2])


def test_win_fractions_by_hand():
    # prompt 0: reference 0.5 vs [0.6, 0.5, 0.1, 0.9] -> (1 + 0.5 + 0 + 1) / 4 = 0.625
    # prompt 1: reference 0.0 vs [-1, -2, None, -3] -> 0 / 3 = 0
    # prompt 2: reference None -> None
    rewards = [0.6, 0.5, 0.1, 0.9, -1.0, -2.0, None, -3.0, 1.0, 1.0, 1.0, 1.0]
    fractions = win_fractions(rewards, [0.5, 0.0, None], 4)
    assert fractions == [0.625, 0.0, None]
    summary = prompt_level_summary(fractions)
    # mean 0.3125, SE = sqrt(((0.3125)^2 * 2) / 1 / 2) = 0.3125
    assert summary == {"mean": pytest.approx(0.3125), "stderr": pytest.approx(0.3125), "n": 2}
    with pytest.raises(ValueError, match="match"):
        win_fractions([1.0, 2.0], [0.0, 0.0], 2)


def test_prompt_level_summary_by_hand():
    # per-prompt means [0.1, 0.5, 0.3]: mean 0.3, var (0.04 + 0.04 + 0) / 2 = 0.04, SE 0.2/sqrt(3)
    summary = prompt_level_summary([0.1, 0.5, 0.3, None])
    assert summary["mean"] == pytest.approx(0.3)
    assert summary["stderr"] == pytest.approx(0.2 / math.sqrt(3))
    assert summary["n"] == 3


def test_conditioning_curve_by_hand():
    # 3 prompts x 2 samples per control; per-prompt means
    #   best  [1, 3 | 2, 2 | 0, 1]      -> [2.0, 2.0, 0.5]
    #   mid   [0, 1 | None, 2 | 1, 1]   -> [0.5, 2.0, 1.0] (the missing reward is skipped)
    #   worst [0, 0 | 1, 1 | 0.5, 0.5]  -> [0.0, 1.0, 0.5]
    curve = conditioning_curve(
        ["best", "mid", "worst"],
        [
            [1.0, 3.0, 2.0, 2.0, 0.0, 1.0],
            [0.0, 1.0, None, 2.0, 1.0, 1.0],
            [0.0, 0.0, 1.0, 1.0, 0.5, 0.5],
        ],
        2,
    )
    best, mid, worst = curve["controls"]
    assert [c["quantile"] for c in curve["controls"]] == [0, 1, 2]
    assert [c["control"] for c in curve["controls"]] == ["best", "mid", "worst"]
    assert best["per_prompt_reward"] == [2.0, 2.0, 0.5]
    assert mid["per_prompt_reward"] == [0.5, 2.0, 1.0]
    assert worst["per_prompt_reward"] == [0.0, 1.0, 0.5]
    # best: mean 1.5, deviations [0.5, 0.5, -1], variance 1.5 / 2, SE sqrt(0.75 / 3) = 0.5
    assert best["reward_mean"] == pytest.approx(1.5)
    assert best["reward_stderr"] == pytest.approx(0.5)
    assert mid["reward_mean"] == pytest.approx(3.5 / 3)
    # best - worst per prompt [2, 1, 0]: mean 1, variance 1, SE sqrt(1 / 3); W/T/L 2/1/0
    assert curve["best_minus_worst"] == {
        "mean": pytest.approx(1.0),
        "stderr": pytest.approx(math.sqrt(1 / 3)),
        "n": 3,
        "wins": 2,
        "ties": 1,
        "losses": 0,
    }
    with pytest.raises(ValueError, match="2 reward lists for 3 controls"):
        conditioning_curve(["a", "b", "c"], [[1.0], [2.0]], 1)
