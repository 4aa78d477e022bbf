"""Tests that pin behaviour mutation testing (mutmut over quantiles.py, pool.py, losses.py) found
unguarded: each one fails under at least one surviving mutant of the previous suite."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch

import alignment.quantiles as quantiles
from alignment.errors import UserError
from alignment.losses import quark_loss, token_kl, token_logprobs
from alignment.pool import ITERATIONS_KEY, DataPool
from alignment.records import SampleRecord


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "alignment.quantiles"]


@pytest.mark.parametrize(
    ("groups", "k", "scope", "message"),
    [
        (
            [[1.0], [1.0, 2.0, 3.0]],
            2,
            "prompt",
            "1 prompt(s) have fewer usable rewards (as few as 1) than the 2 quantiles: all of "
            "their generations go to the worst quantile 1; draw at least 2 samples per prompt",
        ),
        (
            [[1.0], [2.0, None]],
            3,
            "global",
            "1 global pool(s) have fewer usable rewards (as few as 2) than the 3 quantiles: all "
            "of their generations go to the worst quantile 2; draw at least 3 samples per prompt",
        ),
    ],
)
def test_too_few_rewards_warning_text(monkeypatch, caplog, groups, k, scope, message) -> None:
    monkeypatch.setattr(quantiles, "_warned_too_few", set())
    with caplog.at_level(logging.WARNING, logger="alignment.quantiles"):
        quantiles.assign_quantiles_scoped(groups, k, scope)
    assert _warnings(caplog) == [message]


def test_global_scope_splits_three_groups_back_in_order() -> None:
    # The split-back offset must accumulate over groups (a third group exposes a reset).
    groups = [[3.0, 2.0], [1.0], [6.0, 5.0, 4.0]]
    assert quantiles.assign_quantiles_global(groups, 2) == [[1, 1], [1], [0, 0, 0]]


def test_one_quantile_is_allowed_in_prompt_scope() -> None:
    assert quantiles.assign_quantiles_scoped([[1.0, None]], 1, "prompt") == [[0, None]]


# ------------------------------------------------------------------ pool


def test_merging_a_prompt_keeps_first_id_newest_iteration_and_all_extras() -> None:
    pool = DataPool([SampleRecord("p", ["a"], iteration=1, extra={"source": "x"})])
    pool.add([SampleRecord("p", ["b"], id="n1", extra={"note": "y"})])
    (merged,) = pool.records
    assert merged.id == "n1"  # the old record had none
    assert merged.iteration == 1  # the new record did not say
    assert merged.extra["source"] == "x" and merged.extra["note"] == "y"
    assert merged.extra[ITERATIONS_KEY] == [1, None]

    pool = DataPool([SampleRecord("p", ["a"], id="o1")])
    pool.add([SampleRecord("p", ["b"], id="n1", iteration=3)])
    assert pool.records[0].id == "o1" and pool.records[0].iteration == 3


def test_merging_fills_a_column_only_one_side_has() -> None:
    pool = DataPool([SampleRecord("p", ["a"], rewards=[1.0])])
    pool.add([SampleRecord("p", ["b"])])
    (merged,) = pool.records
    assert merged.rewards == [1.0, None]
    assert merged.feedback is None and merged.quantiles is None  # neither side had them
    assert merged.finish_reasons is None


def test_iterations_must_be_integers() -> None:
    prompt = "a prompt that is longer than forty characters, to be cut"
    record = SampleRecord(prompt, ["a"], extra={ITERATIONS_KEY: [1.5]})
    with pytest.raises(UserError) as info:
        DataPool([record])
    assert str(info.value) == (
        f"prompt {prompt[:40]!r}: '{ITERATIONS_KEY}' must be a list of integers or nulls"
    )


@pytest.mark.parametrize(("per_quantile", "k"), [(0, 5), (1, 0)])
def test_draw_refuses_sizes_below_one(per_quantile: int, k: int) -> None:
    with pytest.raises(ValueError, match=r"^num_per_quantile and num_quantiles must be >= 1$"):
        DataPool().draw(per_quantile, k, random.Random(0))


def test_draw_refuses_a_quantile_equal_to_k() -> None:
    pool = DataPool([SampleRecord("p", ["a"], quantiles=[2])])
    with pytest.raises(ValueError, match="outside"):
        pool.draw(1, 2, random.Random(0))


def test_draw_works_without_reasons_rewards_or_feedback() -> None:
    pool = DataPool([SampleRecord("p", ["a", "b"], quantiles=[0, 1])])
    items = pool.draw(1, 2, random.Random(0))
    assert [(i.generation, i.quantile) for i in items] == [("a", 0), ("b", 1)]
    assert all(i.finish_reason is None and i.reward is None and i.feedback is None for i in items)


def test_flush_zero_leaves_the_random_stream_untouched() -> None:
    # A seeded run must draw the same items whether or not a no-op flush happened first.
    pool = DataPool([SampleRecord("p", ["a", "b", "c"], quantiles=[0, 0, 1])])
    rng = random.Random(7)
    pool.flush(0.0, rng)
    assert rng.random() == random.Random(7).random()
    assert pool.records[0].generations == ["a", "b", "c"]


# ------------------------------------------------------------------ losses


def test_kl_defaults_to_alt_direction_and_tolerates_zero_reference_probability() -> None:
    policy = torch.tensor([[[0.0, 1.0, 2.0]]])
    ref = torch.tensor([[[2.0, 0.0, float("-inf")]]])  # the reference never says token 2
    default = token_kl(policy, ref)
    assert torch.equal(default, token_kl(policy, ref, "ref_policy", 0))
    assert not torch.allclose(default, token_kl(policy, ref, "policy_ref"))  # asymmetric case
    assert torch.isfinite(default).all()  # 0 * log 0 counts as 0, not NaN


def test_quark_loss_defaults_to_no_added_tokens_and_skips_a_zero_weighted_infinite_kl() -> None:
    policy = torch.tensor([[[0.0, 5.0, float("-inf")]]])  # policy never says token 2
    ref = torch.tensor([[[0.0, 0.0, 0.0]]])  # the reference does: KL(ref || policy) = inf
    labels, mask = torch.tensor([[1]]), torch.tensor([[1]])
    loss, stats = quark_loss(policy, labels, mask, entropy_coef=0.0, ref_logits=ref)
    assert torch.isfinite(loss)  # kl_coef = 0: the infinite KL is reported, never added
    assert math.isinf(float(stats["kl"]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: token_logprobs(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long)),
            r"^labels \(1, 3\) do not match logits \(1, 2, 3\)$",
        ),
        (
            lambda: quark_loss(
                torch.zeros(1, 2, 3),
                torch.zeros(1, 2, dtype=torch.long),
                torch.ones(1, 3),
                entropy_coef=0.0,
            ),
            r"^mask \(1, 3\) does not match labels \(1, 2\)$",
        ),
        (
            lambda: quark_loss(
                torch.zeros(1, 2, 3),
                torch.zeros(1, 2, dtype=torch.long),
                torch.zeros(1, 2),
                entropy_coef=0.0,
            ),
            r"^mask selects no response token; the masked mean would be 0/0$",
        ),
        (
            lambda: token_kl(torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), num_added_tokens=-1),
            r"^num_added_tokens must be >= 0, got -1$",
        ),
    ],
)
def test_loss_input_errors_say_what_is_wrong(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
