"""Best-of-N estimates from one pool, against numbers worked out by hand."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from alignment.best_of_n import (
    best_of_n_kl,
    best_of_n_probabilities,
    expected_best_of_n,
    kl_bound,
    summarize_best_of_n,
)
from alignment.config import load_config
from alignment.errors import UserError


def test_expected_best_of_n_by_hand():
    rewards = [3.0, 1.0, 2.0]
    assert expected_best_of_n(rewards, 1) == pytest.approx(2.0)  # N = 1: the mean
    # subsets of 2: {1,2} -> 2, {1,3} -> 3, {2,3} -> 3; mean 8/3
    assert expected_best_of_n(rewards, 2) == pytest.approx(8 / 3)
    assert expected_best_of_n(rewards, 3) == 3.0  # N = M: the max
    # ties: {1,1} -> 1, {1,2} -> 2 twice: 5/3
    assert expected_best_of_n([1.0, 2.0, 1.0], 2) == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="1 <= n <= 3"):
        expected_best_of_n(rewards, 4)


def test_expected_best_of_n_is_the_mean_over_all_subsets():
    rng = random.Random(0)
    rewards = [rng.gauss(0, 1) for _ in range(7)]
    for n in range(1, 8):
        subsets = list(itertools.combinations(rewards, n))
        brute = sum(max(s) for s in subsets) / len(subsets)
        assert expected_best_of_n(rewards, n) == pytest.approx(brute)


def test_probabilities_and_kl_by_hand():
    # M = 3, N = 2: ranks 1..3 win with 1/9, 3/9, 5/9
    assert best_of_n_probabilities([3.0, 1.0, 2.0], 2) == pytest.approx([5 / 9, 1 / 9, 3 / 9])
    # KL = 1/9 log(3/9) + 3/9 log(9/9) + 5/9 log(15/9)
    expected = (1 / 9) * math.log(1 / 3) + (5 / 9) * math.log(5 / 3)
    assert best_of_n_kl([3.0, 1.0, 2.0], 2) == pytest.approx(expected)  # 0.161724
    # M = 2, N = 2: 1/4 log(1/2) + 3/4 log(3/2) = 0.130812
    assert best_of_n_kl([0.0, 1.0], 2) == pytest.approx(0.130812, abs=1e-6)
    assert best_of_n_probabilities([0.5, 0.7, 0.1, 0.2], 1) == pytest.approx([0.25] * 4)
    assert best_of_n_kl([0.5, 0.7, 0.1, 0.2], 1) == pytest.approx(0.0, abs=1e-15)


def test_tied_rewards_share_their_ranks_mass():
    # ranks 1-2 tied: (2/3)^2 = 4/9 shared, 2/9 each; the top keeps 5/9
    assert best_of_n_probabilities([1.0, 1.0, 2.0], 2) == pytest.approx([2 / 9, 2 / 9, 5 / 9])
    expected = (4 / 9) * math.log(2 / 3) + (5 / 9) * math.log(5 / 3)  # 0.103585
    assert best_of_n_kl([1.0, 1.0, 2.0], 2) == pytest.approx(expected)
    # all tied: best-of-n is the policy itself
    assert best_of_n_kl([4.0, 4.0, 4.0], 3) == pytest.approx(0.0, abs=1e-15)


def test_identical_texts_are_one_outcome():
    # "a" twice scored 1 and 3 (a noisy reward): p(a) = 1/9 + 5/9 = q(a) = 2/3, so KL = 0
    assert best_of_n_kl([1.0, 3.0, 2.0], 2, ["a", "a", "b"]) == pytest.approx(0.0, abs=1e-15)
    # the same text with the same reward is the tie above
    assert best_of_n_kl([1.0, 1.0, 2.0], 2, ["a", "a", "b"]) == pytest.approx(
        best_of_n_kl([1.0, 1.0, 2.0], 2)
    )
    with pytest.raises(ValueError, match="2 texts for 3 rewards"):
        best_of_n_kl([1.0, 1.0, 2.0], 2, ["a", "b"])


def test_kl_estimate_stays_below_the_bound_and_approaches_it():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)  # 0.193147
    rng = random.Random(1)
    for n in (2, 4, 16):
        for m in (n, 4 * n):
            assert best_of_n_kl([rng.random() for _ in range(m)], n) < kl_bound(n)
        large = best_of_n_kl([rng.random() for _ in range(20_000)], n)
        assert large == pytest.approx(kl_bound(n), rel=2e-3)


def test_summary_rows_per_n():
    # two prompts, pool of 2: rewards (1, 3) and (2, None); texts of the second differ
    rewards = [1.0, 3.0, 2.0, None]
    texts = ["x", "y", "z", "w"]
    rows = summarize_best_of_n(rewards, texts, 2, [2, 1])
    assert [r["n"] for r in rows] == [1, 2]
    one, two = rows
    assert one["per_prompt_reward"] == [2.0, 2.0] and one["reward_mean"] == 2.0
    assert one["reward_stderr"] == 0.0 and one["kl_estimate"] == pytest.approx(0.0, abs=1e-15)
    # N = 2: the second prompt has one usable reward, so it drops out
    assert two["per_prompt_reward"] == [3.0, None] and two["reward_prompts"] == 1
    assert two["kl_estimate"] == pytest.approx(0.130812, abs=1e-6)
    assert math.isnan(two["kl_estimate_stderr"])
    assert (one["samples"], two["samples"]) == (2, 4)
    assert two["kl_bound"] == pytest.approx(kl_bound(2))
    with pytest.raises(ValueError, match="every n in 1..2"):
        summarize_best_of_n(rewards, texts, 2, [4])
    with pytest.raises(ValueError, match="not a pool of 3"):
        summarize_best_of_n(rewards, texts, 3, [1])


def test_reward_is_monotone_in_n():
    rng = random.Random(2)
    rewards = [rng.gauss(0, 1) for _ in range(5 * 16)]
    rows = summarize_best_of_n(rewards, [str(r) for r in rewards], 16, [1, 2, 4, 8, 16])
    means = [r["reward_mean"] for r in rows]
    kls = [r["kl_estimate"] for r in rows]
    assert means == sorted(means) and kls == sorted(kls)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm=best-of-n"], "best-of-n trains nothing: set iterations: 0 \\(got 3\\)"),
        (["algorithm=best-of-n", "iterations=0", "train.learning_rate=1"], "section 'train'"),
        (["best_of_n.n=[4]"], "section 'best_of_n' is not read by algorithm 'quark'"),
        (["algorithm=best-of-n", "iterations=0", "best_of_n.n=[2, 2]"], "distinct integers"),
        (["algorithm=best-of-n", "iterations=0", "best_of_n.n=[0, 1]"], ">= 1"),
        (["algorithm=best-of-n", "iterations=0", "best_of_n.n=[]"], "distinct integers"),
        (["iterations=0"], "iterations must be >= 1"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_a_best_of_n_config_loads():
    config = load_config(None, ["algorithm=best-of-n", "iterations=0"])
    assert config.best_of_n.n == [1, 2, 4, 8, 16] and config.iterations == 0
