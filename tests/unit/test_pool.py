"""Tests for alignment.pool: append, ALT flush, requantize scopes, balanced draw, round trip."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from dataclasses import FrozenInstanceError

import pytest

from alignment.errors import UserError
from alignment.pool import DataPool, TrainItem
from alignment.records import SampleRecord, load_samples


def _record(prompt: str, n: int, iteration: int | None = 1, **fields) -> SampleRecord:
    """n generations "g0".."g{n-1}" whose reward, feedback and iteration encode their index."""
    defaults = {
        "rewards": [float(j) for j in range(n)],
        "feedback": [f"f{j}" for j in range(n)],
        "finish_reasons": ["stop" if j % 2 else "length" for j in range(n)],
    }
    defaults.update(fields)
    return SampleRecord(
        prompt=prompt, generations=[f"g{j}" for j in range(n)], iteration=iteration, **defaults
    )


# ---- add ----
def test_add_new_prompts_counts_generations_and_copies() -> None:
    a, b = _record("A", 3), _record("B", 2)
    pool = DataPool([a, b])
    assert len(pool) == 5
    assert [r.prompt for r in pool.records] == ["A", "B"]
    assert pool.records[0].extra["iterations"] == [1, 1, 1]
    pool.records[0].generations.append("x")
    assert a.generations == ["g0", "g1", "g2"]  # the caller's record is untouched


def test_add_same_prompt_appends_every_field_aligned() -> None:
    pool = DataPool([_record("A", 2, iteration=1)])
    second = SampleRecord(
        prompt="A",
        generations=["h0"],
        rewards=[9.5],
        feedback=["fb"],
        finish_reasons=["stop"],
        iteration=2,
    )
    pool.add([second, _record("B", 1)])
    (a, b) = pool.records
    assert len(pool) == 4
    assert a.generations == ["g0", "g1", "h0"]
    assert a.rewards == [0.0, 1.0, 9.5]
    assert a.feedback == ["f0", "f1", "fb"]
    assert a.finish_reasons == ["length", "stop", "stop"]
    assert a.extra["iterations"] == [1, 1, 2]
    assert a.iteration == 2
    assert b.generations == ["g0"]


def test_add_pads_a_field_only_one_side_has() -> None:
    pool = DataPool([SampleRecord(prompt="A", generations=["x"], iteration=None)])
    pool.add([_record("A", 2, iteration=3)])
    (a,) = pool.records
    assert a.rewards == [None, 0.0, 1.0]
    assert a.feedback == [None, "f0", "f1"]
    assert a.finish_reasons == ["length", "length", "stop"]  # unknown end = possible cut-off
    assert a.extra["iterations"] == [None, 3, 3]


def test_add_normalizes_rewards_and_rejects_misaligned_records() -> None:
    pool = DataPool([_record("A", 3, rewards=[1, float("nan"), float("inf")])])
    rewards = pool.records[0].rewards
    assert rewards == [1.0, None, None] and isinstance(rewards[0], float)
    with pytest.raises(UserError, match="'rewards' has 2 entries"):
        pool.add([_record("B", 3, rewards=[1.0, 2.0])])


# ---- flush ----
def _quantized_pool() -> DataPool:
    # quantile groups: 0 x4, 1 x2, 2 x1, None x3 (generation order mixed on purpose)
    quantiles = [0, 1, None, 0, 2, None, 0, 1, 0, None]
    return DataPool([_record("A", 10, quantiles=quantiles), _record("B", 2, quantiles=[0, 0])])


def test_flush_zero_keeps_everything_and_one_empties() -> None:
    pool = _quantized_pool()
    before = copy.deepcopy(pool.records)
    pool.flush(0.0, random.Random(0))
    assert pool.records == before
    pool.flush(1.0, random.Random(0))
    assert len(pool) == 0 and pool.records == []


def test_flush_half_keeps_int_share_per_quantile() -> None:
    for seed in range(20):
        pool = _quantized_pool()
        pool.flush(0.5, random.Random(seed))
        a, b = pool.records
        # int(4*.5)=2, int(2*.5)=1, int(1*.5)=0, None group int(3*.5)=1; B: int(2*.5)=1
        assert Counter(a.quantiles) == {0: 2, 1: 1, None: 1}
        assert b.quantiles == [0]
        assert len(pool) == 5


def test_flush_keeps_fields_aligned_and_in_generation_order() -> None:
    kept_sets = set()
    for seed in range(20):
        pool = _quantized_pool()
        original = copy.deepcopy(pool.records[0])
        pool.flush(0.5, random.Random(seed))
        a = pool.records[0]
        idx = [int(g[1:]) for g in a.generations]
        assert idx == sorted(idx)
        kept_sets.add(tuple(idx))
        assert a.rewards == [original.rewards[j] for j in idx]
        assert a.feedback == [f"f{j}" for j in idx]
        assert a.finish_reasons == [original.finish_reasons[j] for j in idx]
        assert a.quantiles == [original.quantiles[j] for j in idx]
        assert a.extra["iterations"] == [1] * len(idx)
    assert len(kept_sets) > 1  # the choice is random


def test_flush_removes_emptied_prompts_and_validates() -> None:
    pool = DataPool([_record("A", 1, quantiles=[0]), _record("B", 4, quantiles=None)])
    pool.flush(0.5, random.Random(0))  # A: int(1*.5)=0 -> gone; B: one no-quantile group of 4
    assert [r.prompt for r in pool.records] == ["B"] and len(pool) == 2
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="drop_factor"):
            pool.flush(bad, random.Random(0))


def test_flush_is_deterministic_for_a_seed() -> None:
    runs = []
    for _ in range(2):
        pool = _quantized_pool()
        pool.flush(0.5, random.Random(7))
        runs.append(pool.records)
    assert runs[0] == runs[1]


# ---- requantize ----
def test_requantize_prompt_vs_global_scope() -> None:
    # K = 2. Per prompt: each group of 4 splits 2/2 -> A [1,1,0,0], B [1,1,0,0].
    # Global: ranking 8,7,6,5 | 4,3,2,1 -> all of B best, all of A worst.
    records = [
        _record("A", 4, rewards=[1.0, 2.0, 3.0, 4.0]),
        _record("B", 4, rewards=[5.0, 6.0, 7.0, 8.0]),
        _record("C", 2, rewards=[None, 3.5]),
        SampleRecord(prompt="D", generations=["x"]),
    ]
    pool = DataPool(records)
    pool.requantize(2, scope="prompt")
    assert [r.quantiles for r in pool.records] == [[1, 1, 0, 0], [1, 1, 0, 0], [None, 1], [None]]
    pool.requantize(2, scope="global")
    # global ranking of the 9 rewards: 8 7 6 5 | 4 3.5 3 2 1 -> remainder goes to the worst
    assert [r.quantiles for r in pool.records] == [[1, 1, 1, 1], [0, 0, 0, 0], [None, 1], [None]]


def test_alt_update_order_flush_add_requantize() -> None:
    pool = DataPool([_record("A", 4)])
    pool.flush(1.0, random.Random(0))
    pool.add([_record("A", 2, iteration=2, rewards=[-1.0, 10.0])])
    pool.requantize(2)
    (a,) = pool.records
    assert a.generations == ["g0", "g1"] and a.quantiles == [1, 0]
    assert a.extra["iterations"] == [2, 2] and a.iteration == 2


# ---- draw ----
def _one_quantile_pool() -> DataPool:
    # one quantile holding 1 "stop" item (g2) and 3 "length" items
    return DataPool(
        [
            _record(
                "A",
                4,
                quantiles=[0, 0, 0, 0],
                finish_reasons=["length", "length", "stop", "length"],
            )
        ]
    )


def test_draw_prefers_stop_then_fills_from_length() -> None:
    seconds = set()
    for seed in range(30):
        items = _one_quantile_pool().draw(2, 1, random.Random(seed))
        assert len(items) == 2
        assert items[0].generation == "g2" and items[0].finish_reason == "stop"
        assert items[1].finish_reason == "length"
        seconds.add(items[1].generation)
    assert seconds == {"g0", "g1", "g3"}  # the fill follows the shuffle


def test_draw_items_carry_their_own_fields() -> None:
    pool = _quantized_pool()
    items = pool.draw(2, 3, random.Random(0))
    assert all(isinstance(it, TrainItem) for it in items)
    quantiles = pool.records[0].quantiles
    for it in items:
        j = int(it.generation[1:])
        assert it.reward == float(j) and it.feedback == f"f{j}"
        assert it.finish_reason == ("stop" if j % 2 else "length")
        if it.prompt == "A":
            assert it.quantile == quantiles[j]
    # A: q0 2 of 4, q1 2 of 2, q2 1 of 1; B: q0 2 of 2; prompt then quantile order
    assert [(it.prompt, it.quantile) for it in items] == [("A", 0)] * 2 + [("A", 1)] * 2 + [
        ("A", 2),
        ("B", 0),
        ("B", 0),
    ]
    with pytest.raises(FrozenInstanceError):
        items[0].quantile = 3  # type: ignore[misc]


def test_draw_is_deterministic_for_a_seed_and_varies_with_it() -> None:
    pool = DataPool([_record(f"P{i}", 12, quantiles=[j % 3 for j in range(12)]) for i in range(4)])
    base = pool.draw(2, 3, random.Random(42))
    assert base == pool.draw(2, 3, random.Random(42))
    assert any(pool.draw(2, 3, random.Random(s)) != base for s in range(1, 6))


def test_draw_never_takes_items_without_quantile() -> None:
    pool = DataPool([_record("A", 4, rewards=[None, 1.0, None, 2.0]), _record("B", 2)])
    pool.requantize(1)
    pool.add([_record("C", 3)])  # appended, never bucketed: quantiles None
    for seed in range(10):
        items = pool.draw(10, 1, random.Random(seed))
        assert sorted((it.prompt, it.generation) for it in items) == [
            ("A", "g1"),
            ("A", "g3"),
            ("B", "g0"),
            ("B", "g1"),
        ]


def test_draw_rejects_quantiles_from_another_k() -> None:
    pool = DataPool([_record("A", 2, quantiles=[0, 4])])
    with pytest.raises(ValueError, match="outside"):
        pool.draw(2, 3, random.Random(0))


# ---- save / load ----
def test_save_load_round_trip_is_exact(tmp_path) -> None:
    # 0.1 + 1e-9 and 0.1 are equal as float32 but ranked apart as float64.
    pool = DataPool([_record("A", 3, rewards=[0.1, 0.1 + 1e-9, 0.1 + 0.2], iteration=1)])
    pool.add([_record("A", 2, iteration=2, rewards=[1e-300, None]), _record("B\nü", 1, None)])
    pool.requantize(2)
    # ranking 0.3, 0.1+1e-9 | 0.1, 1e-300; as float32 the tie would put 0.1 first instead
    assert pool.records[0].quantiles == [1, 0, 0, 1, None]
    path = tmp_path / "pool.jsonl"
    assert pool.save(path) == 2
    loaded = DataPool.load(path)
    assert loaded.records == pool.records
    assert loaded.records[0].rewards[1] == 0.1 + 1e-9
    assert all(type(r) is float for r in loaded.records[0].rewards if r is not None)
    assert loaded.draw(1, 2, random.Random(3)) == pool.draw(1, 2, random.Random(3))
    loaded.requantize(2)
    assert loaded.records == pool.records
    # plain ALT-compatible JSONL, readable by the samples loader; no pickle
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["iterations"] == [1, 1, 1, 2, 2] and "iterations" not in rows[1]
    assert [r.prompt for r in load_samples(path)] == ["A", "B\nü"]


def test_load_rejects_a_malformed_iterations_field(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "A", "generations": ["x"], "iterations": [1, 2]}) + "\n")
    with pytest.raises(UserError, match="iterations"):
        DataPool.load(path)
