"""Evaluation metrics and plots, against numbers worked out by hand in the comments."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch

from alignment.metrics import (
    distinct_n,
    mean_and_stderr,
    mean_perplexity,
    per_sample_perplexity,
    sequence_kl_estimate,
    summarize_rewards_by_quantile,
)
from alignment.plots import plot_iterations, plot_reward_by_quantile

LN2 = math.log(2.0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- mean_and_stderr


def test_mean_and_stderr_by_hand():
    # mean = 10/4 = 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; var (ddof 1) = 5/3;
    # std = 1.29099; stderr = std / sqrt(4) = 0.645497
    mean, stderr = mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert stderr == pytest.approx(0.645497, abs=1e-6)
    assert stderr == pytest.approx(math.sqrt(5 / 3) / 2)


def test_mean_and_stderr_drops_missing_values():
    # kept [1, 3]: mean 2; var (ddof 1) = (1 + 1) / 1 = 2; stderr = sqrt(2) / sqrt(2) = 1
    mean, stderr = mean_and_stderr([1.0, None, math.nan, 3, math.inf, -math.inf])
    assert mean == 2.0
    assert stderr == pytest.approx(1.0)


def test_mean_and_stderr_too_few_values_is_nan():
    mean, stderr = mean_and_stderr([7.0])
    assert mean == 7.0 and math.isnan(stderr)
    mean, stderr = mean_and_stderr([])
    assert math.isnan(mean) and math.isnan(stderr)
    mean, stderr = mean_and_stderr([None, math.nan])
    assert math.isnan(mean) and math.isnan(stderr)


# ---------------------------------------------------------------- perplexity


def test_perplexity_of_uniform_logprobs_is_vocab_size():
    # every token has p = 1/v, so mean NLL = log v and PPL = v, whatever the length
    v = 7
    logprobs = torch.full((2, 5), math.log(1.0 / v))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    ppl = per_sample_perplexity(logprobs, mask)
    assert ppl.shape == (2,)
    torch.testing.assert_close(ppl, torch.tensor([7.0, 7.0]))
    assert mean_perplexity(ppl) == pytest.approx(7.0)


def test_perplexity_ignores_masked_tokens_and_empty_rows():
    # row 0: tokens p = 1/2, 1/4, then -inf padding (masked; must not give NaN):
    #   mean NLL = (ln 2 + 2 ln 2) / 2 = 1.5 ln 2  ->  PPL = 2 ** 1.5 = 2.828427
    # row 1: uniform over 4 on 3 tokens, the 4th masked (a huge logprob that must not count) -> 4
    # row 2: no tokens -> NaN
    logprobs = torch.tensor(
        [
            [-LN2, -2 * LN2, -math.inf, -math.inf],
            [-2 * LN2, -2 * LN2, -2 * LN2, 50.0],
            [-1.0, -1.0, -1.0, -1.0],
        ]
    )
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    ppl = per_sample_perplexity(logprobs, mask)
    assert ppl[0].item() == pytest.approx(2**1.5, rel=1e-6)
    assert ppl[1].item() == pytest.approx(4.0, rel=1e-6)
    assert math.isnan(ppl[2].item())
    # ALT's report: nanmean of per-sample PPLs = (2.828427 + 4) / 2 = 3.414214, not the corpus
    # perplexity exp((3 ln 2 + 6 ln 2) / 5) = 2 ** 1.8 = 3.482
    assert mean_perplexity(ppl) == pytest.approx((2**1.5 + 4) / 2, rel=1e-6)


def test_perplexity_upcasts_half_precision_and_all_empty_is_nan():
    logprobs = torch.full((1, 3), -LN2, dtype=torch.bfloat16)
    ppl = per_sample_perplexity(logprobs, torch.ones(1, 3))
    assert ppl.dtype == torch.float32
    assert ppl.item() == pytest.approx(2.0, rel=1e-2)
    assert math.isnan(mean_perplexity(per_sample_perplexity(torch.zeros(2, 3), torch.zeros(2, 3))))


def test_perplexity_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mask shape"):
        per_sample_perplexity(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"must be \(b,\)"):
        mean_perplexity(torch.ones(2, 3))  # logprobs, not per-sample perplexities
    with pytest.raises(ValueError, match=r"\(b, t\)"):
        per_sample_perplexity(torch.zeros(3), torch.ones(3))


# ---------------------------------------------------------------- KL estimate


def test_kl_estimate_zero_when_policy_equals_reference():
    logprobs = torch.log(torch.tensor([[0.3, 0.9, 0.5], [0.1, 0.2, 0.7]]))
    kl = sequence_kl_estimate(logprobs, logprobs.clone(), torch.ones(2, 3))
    torch.testing.assert_close(kl, torch.zeros(2))


def test_kl_estimate_sums_masked_log_ratios():
    # row 0: (ln 1/2 - ln 1/4) + (ln 1/2 - ln 1/4) = 2 ln 2; 3rd token masked (ref -inf there)
    # row 1: ln 1/4 - ln 1/2 = -ln 2 (a single sample may be negative); 2nd and 3rd masked
    # row 2: no tokens -> 0 (empty sum)
    policy = torch.tensor([[-LN2, -LN2, -1.0], [-2 * LN2, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2 * LN2, -2 * LN2, -math.inf], [-LN2, -5.0, -5.0], [-3.0, -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    kl = sequence_kl_estimate(policy, ref, mask)
    torch.testing.assert_close(kl, torch.tensor([2 * LN2, -LN2, 0.0]))


def test_kl_estimate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="ref_logprobs"):
        sequence_kl_estimate(torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3))


# ---------------------------------------------------------------- distinct_n


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the  cat\nran"]
    # unigrams: the cat sat the cat ran -> 6 total, {the, cat, sat, ran} 4 unique -> 4/6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 4 total, 3 unique -> 3/4
    # (ALT's definition divides by the 6 words instead: 3/6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # trigrams: (the cat sat) (the cat ran) -> 2 total, 2 unique
    assert distinct_n(texts, 3) == 1.0
    # no text has 4 words -> no 4-grams
    assert distinct_n(texts, 4) == 0.0


def test_distinct_n_does_not_join_texts():
    # bigrams within each text: (a b), (a b) -> 1 unique / 2 total; joined across the boundary
    # there would be a third bigram (b a) and the answer would be 2/3
    assert distinct_n(["a b", "a b"], 2) == 0.5


def test_distinct_n_edge_cases():
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "   "], 1) == 0.0
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(["a"], 0)


# ---------------------------------------------------------------- rewards by quantile


def test_summarize_rewards_by_quantile():
    # quantile 0: 3.0 (the None reward dropped) -> 3.0
    # quantile 1: 1.0, 2.0 (the NaN reward dropped) -> 1.5; the unranked 5.0 is skipped
    rewards = [1.0, 3.0, None, 2.0, math.nan, 5.0]
    quantiles = [1, 0, 0, 1, 1, None]
    summary = summarize_rewards_by_quantile(rewards, quantiles)
    assert summary == {0: 3.0, 1: 1.5}
    assert list(summary) == [0, 1]
    assert summarize_rewards_by_quantile([], []) == {}


def test_summarize_rewards_by_quantile_rejects_length_mismatch():
    with pytest.raises(ValueError, match="2 rewards but 1 quantiles"):
        summarize_rewards_by_quantile([1.0, 2.0], [0])


# ---------------------------------------------------------------- plots


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    # IHDR is the first chunk: 4-byte length, b"IHDR", then big-endian width and height
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


FULL_ROWS = [
    {
        "iteration": i,
        "eval/reward_mean": 2.7 + 0.2 * i,
        "eval/reward_stderr": 0.05,
        "eval/greedy_reward_mean": 2.9 + 0.2 * i,
        "eval/ref_perplexity": 1.9 + 0.1 * i,
        "eval/kl": 0.5 * i,
        "eval/length": 30.0 + 4 * i,
        "train/loss": 1.0,
    }
    for i in range(4)
]


def test_plot_iterations_writes_png(tmp_path):
    path = tmp_path / "plots" / "iterations.png"
    plot_iterations(FULL_ROWS, path)
    width, height = _png_size(path)
    assert width > 0 and height > 0
    # only the PNG is left in the folder: the temp file was renamed over it
    assert [p.name for p in path.parent.iterdir()] == ["iterations.png"]


def test_plot_iterations_skips_missing_series(tmp_path):
    full = tmp_path / "full.png"
    plot_iterations(FULL_ROWS, full)
    # no KL, length or perplexity anywhere, stderr and greedy only in some rows, one reward None
    rows = [
        {"iteration": 0, "eval/reward_mean": 2.7},
        {"iteration": 1, "eval/reward_mean": None, "eval/reward_stderr": math.nan},
        {"iteration": 2, "eval/reward_mean": 3.1, "eval/reward_stderr": 0.1},
        {"eval/greedy_reward_mean": 3.3},
    ]
    partial = tmp_path / "partial.png"
    plot_iterations(rows, partial)
    full_w, full_h = _png_size(full)
    part_w, part_h = _png_size(partial)
    # panels absent from every row are not drawn: 1 panel instead of 3, same width
    assert part_w == full_w
    assert part_h * 3 == full_h


def test_plot_iterations_with_nothing_to_draw(tmp_path):
    plot_iterations([], tmp_path / "empty.png")
    plot_iterations([{"iteration": 0, "train/loss": 1.0}], tmp_path / "no_eval.png")
    _png_size(tmp_path / "empty.png")
    _png_size(tmp_path / "no_eval.png")


def test_plot_iterations_overwrites_existing_file(tmp_path):
    path = tmp_path / "iterations.png"
    path.write_bytes(b"old")
    plot_iterations(FULL_ROWS, path)
    _png_size(path)


def test_plot_reward_by_quantile_writes_png(tmp_path):
    path = tmp_path / "by_quantile.png"
    per_iteration = {
        0: {0: 3.1, 1: 2.8, 2: 2.4},
        1: {0: 3.3, 1: 3.0, 2: math.nan},
        2: {},
    }
    plot_reward_by_quantile(per_iteration, path)
    width, height = _png_size(path)
    assert width > 0 and height > 0
    plot_reward_by_quantile({}, tmp_path / "empty.png")
    _png_size(tmp_path / "empty.png")
