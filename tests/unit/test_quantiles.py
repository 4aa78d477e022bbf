"""Tests for alignment.quantiles: golden vectors from ALT's data pool plus hand-worked cases."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from alignment.quantiles import (
    assign_quantiles,
    assign_quantiles_global,
    assign_quantiles_scoped,
)

# Shipped with the repository (see tests/golden/README.md), so these tests always run.
GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"


def _golden_params(key: str) -> list[Any]:
    """One pytest param per golden case (id = case name); a missing file is an error, not a skip."""
    cases = json.loads((GOLDEN_DIR / "quantiles.json").read_text())[key]
    assert cases, f"no {key} in {GOLDEN_DIR / 'quantiles.json'}"
    return [pytest.param(case, id=case["name"]) for case in cases]


# ---- golden vectors (exact integer match) ----
@pytest.mark.parametrize("case", _golden_params("cases"))
def test_golden_case(case: dict[str, Any]) -> None:
    got = assign_quantiles(case["rewards"], case["num_quantiles"])
    assert got == case["expected"]


@pytest.mark.parametrize("case", _golden_params("cases"))
def test_golden_case_prompt_scope_matches(case: dict[str, Any]) -> None:
    # A single group is the same in both scopes.
    for scope in ("prompt", "global"):
        got = assign_quantiles_scoped([case["rewards"]], case["num_quantiles"], scope)
        assert got == [case["expected"]]


@pytest.mark.parametrize("case", _golden_params("error_cases"))
def test_golden_error_cases_are_skipped(case: dict[str, Any]) -> None:
    # ALT raises here; we deliberately return all None (prompt skipped).
    got = assign_quantiles(case["rewards"], case["num_quantiles"])
    assert got == [None] * len(case["rewards"])


# ---- the rule, worked by hand ----
def test_remainder_goes_to_worst_bucket() -> None:
    # m = 7, K = 3 -> b = 2: ranks 0-1 -> 0, ranks 2-3 -> 1, ranks 4-6 -> 2.
    rewards = [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert assign_quantiles(rewards, 3) == [0, 0, 1, 1, 2, 2, 2]


def test_fewer_samples_than_buckets_all_worst() -> None:
    assert assign_quantiles([5.0, 1.0], 5) == [4, 4]


def test_ties_keep_generation_order() -> None:
    # Sorted: 3.0 (j=1), then the 2.0 tie in order j=0, j=2, j=3 -> b = 2.
    assert assign_quantiles([2.0, 3.0, 2.0, 2.0], 2) == [0, 0, 1, 1]


def test_negative_zero_ties_zero() -> None:
    assert assign_quantiles([-0.0, 0.0], 2) == [0, 1]
    assert assign_quantiles([0.0, -0.0], 2) == [0, 1]


def test_none_dropped_before_ranking() -> None:
    # m = 4 kept, b = 2.
    assert assign_quantiles([None, 1.0, 4.0, None, 3.0, 2.0], 2) == [None, 1, 0, None, 0, 1]


def test_nan_and_inf_are_missing_and_not_ranked() -> None:
    # If +inf were ranked it would take bucket 0; kept m = 2, b = 1: 2.0 -> 0, 1.0 -> 1.
    rewards = [math.nan, 1.0, math.inf, 2.0, -math.inf]
    assert assign_quantiles(rewards, 2) == [None, 1, None, 0, None]


def test_single_quantile_is_all_best() -> None:
    assert assign_quantiles([3.0, None, -1.0], 1) == [0, None, 0]


def test_integer_rewards_accepted() -> None:
    assert assign_quantiles([1, 3, 2, 0], 2) == [1, 0, 0, 1]


@pytest.mark.parametrize("k", [0, -1])
def test_invalid_num_quantiles_raises(k: int) -> None:
    with pytest.raises(ValueError, match="num_quantiles"):
        assign_quantiles([1.0, 2.0], k)
    with pytest.raises(ValueError, match="num_quantiles"):
        assign_quantiles_global([[1.0], [2.0]], k)
    for scope in ("prompt", "global"):
        with pytest.raises(ValueError, match="num_quantiles"):
            assign_quantiles_scoped([], k, scope)


# ---- scopes ----
def test_global_vs_prompt_scope_worked_example() -> None:
    # Prompt A got the two best rewards overall, prompt B the two worst.
    groups = [[3.0, 2.0], [1.0, 0.0]]
    # Per prompt: each prompt has its own best and worst.
    assert assign_quantiles_scoped(groups, 2, "prompt") == [[0, 1], [0, 1]]
    # Global: flattened [3, 2, 1, 0], b = 2 -> A is all best, B all worst.
    assert assign_quantiles_scoped(groups, 2, "global") == [[0, 0], [1, 1]]


def test_global_scope_shapes_none_and_empty_groups() -> None:
    # Flattened [3, 1, 2, None, 0, 5], m = 5 kept, K = 2, b = 2:
    # sorted 5 (g3), 3 (g0), 2 (g1), 1 (g0), 0 (g1) -> ranks 0-1 -> 0, ranks 2-4 -> 1.
    groups: list[list[float | None]] = [[3.0, 1.0], [2.0, None, 0.0], [], [5.0]]
    assert assign_quantiles_global(groups, 2) == [[0, 1], [1, None, 1], [], [0]]


def test_global_scope_ties_across_groups_go_to_earlier_group() -> None:
    assert assign_quantiles_global([[1.0], [1.0]], 2) == [[0], [1]]


def test_prompt_scope_skips_groups_without_rewards() -> None:
    groups: list[list[float | None]] = [[None, None], [], [2.0, 1.0]]
    assert assign_quantiles_scoped(groups, 2, "prompt") == [[None, None], [], [0, 1]]


def test_unknown_scope_raises() -> None:
    with pytest.raises(ValueError, match="scope"):
        assign_quantiles_scoped([[1.0]], 2, "batch")  # type: ignore[arg-type]


def test_input_not_mutated() -> None:
    rewards: list[float | None] = [2.0, None, 1.0]
    groups: list[list[float | None]] = [rewards, [0.5]]
    assign_quantiles(rewards, 2)
    assign_quantiles_global(groups, 2)
    assert rewards == [2.0, None, 1.0] and groups == [[2.0, None, 1.0], [0.5]]
