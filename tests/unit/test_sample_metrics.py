"""`evaluation.sample_metrics` against a hand count on a tiny fixed set of generations."""

from __future__ import annotations

import pytest

from alignment.evaluation import ScoredSamples, sample_metrics
from alignment.interfaces import Generation


def test_sample_metrics_by_hand():
    texts = ["the cat sat", "", "  \n", "the cat ran"]
    scored = ScoredSamples(
        prompts=["p"] * 4,
        conditioned=["p"] * 4,
        generations=[
            Generation(t, reason, n)
            for t, reason, n in zip(
                texts, ["stop", "stop", "length", "stop"], [3, 1, 2, 3], strict=True
            )
        ],
        rewards=[0.5, -1.0, -1.0, None],
        samples_per_prompt=4,
    )
    m = sample_metrics(scored)
    assert m["reward_mean"] == pytest.approx(-0.5) and m["reward_n"] == 3
    assert m["length"] == pytest.approx(9 / 4)
    assert m["stopped_fraction"] == pytest.approx(3 / 4)
    assert m["empty_fraction"] == pytest.approx(2 / 4)  # whitespace only counts as empty
    # unigrams: the, cat, sat, the, cat, ran -> 4 distinct of 6
    assert m["distinct_1"] == pytest.approx(4 / 6)
