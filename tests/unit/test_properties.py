"""Property-based tests: whatever bytes or values come in, the readers, the config loader and the
quantile bucketing either give a valid result or a UserError (the CLI's one line, exit 2); never a
traceback. Kept fast: at most 100 examples each, no deadline (the CPU is shared).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from tempfile import TemporaryDirectory

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignment.config import Config, config_to_dict, load_config
from alignment.errors import UserError
from alignment.io import read_jsonl
from alignment.prompts import load_prompts
from alignment.quantiles import assign_quantiles, assign_quantiles_scoped
from alignment.records import (
    KNOWN_FIELDS,
    SampleRecord,
    iter_samples,
    load_samples,
    save_samples,
)

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values, including what Python's json reads beyond the standard (NaN, Infinity, big ints).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
record_keys = st.sampled_from(
    [*KNOWN_FIELDS, "post", "title", "subreddit", "label", "summary", "extra"]
)
record_like = st.dictionaries(record_keys, json_values | st.lists(json_scalars, max_size=4))

# Lines mixing valid-looking JSON objects with arbitrary bytes (bad UTF-8, cut lines, NULs).
line_bytes = st.one_of(
    record_like.map(lambda obj: json.dumps(obj).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"   ", b"{", b"[1]", b'"\\ud800"', b'{"prompt": "\\udfff"}', b"NaN"]),
)
files = st.lists(line_bytes, max_size=6).map(lambda lines: b"\n".join(lines))


def _with_file(content: bytes, check) -> None:
    with TemporaryDirectory() as folder:
        path = Path(folder) / "f.jsonl"
        path.write_bytes(content)
        check(path)


@FAST
@given(files)
def test_read_jsonl_yields_objects_or_user_error(content: bytes) -> None:
    def check(path: Path) -> None:
        try:
            rows = list(read_jsonl(path))
        except UserError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return
        assert all(isinstance(obj, dict) and lineno >= 1 for lineno, obj in rows)

    _with_file(content, check)


@FAST
@given(files)
def test_samples_reader_gives_valid_records_that_round_trip(content: bytes) -> None:
    def check(path: Path) -> None:
        try:
            records = [r for _, r in iter_samples(path)]
        except UserError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return
        for r in records:
            assert r.prompt.strip() and r.generations
            assert all(x is None or math.isfinite(x) for x in r.rewards or [])
        # Whatever was accepted can be written and read back to the same records.
        out = path.with_name("out.jsonl")
        save_samples(out, records)
        again = load_samples(out)
        assert [r.to_json() for r in again] == [r.to_json() for r in records]

    _with_file(content, check)


@FAST
@given(record_like)
def test_sample_record_from_any_object_is_valid_or_user_error(obj: dict) -> None:
    try:
        record = SampleRecord.from_json(obj, where="x.jsonl:1")
    except UserError as err:
        assert str(err).startswith("x.jsonl:1: ")
        return
    n = len(record.generations)
    for name in ("rewards", "quantiles", "feedback", "finish_reasons"):
        value = getattr(record, name)
        assert value is None or len(value) == n
    json.dumps(record.to_json(), allow_nan=False)  # what we write is strict JSON


@FAST
@given(files, st.none() | st.integers(min_value=-3, max_value=5))
def test_prompt_reader_gives_prompts_or_user_error(content: bytes, limit: int | None) -> None:
    def check(path: Path) -> None:
        try:
            rows = load_prompts(path, limit=limit)
        except UserError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return
        assert rows and all(isinstance(r.prompt, str) and r.prompt.strip() for r in rows)
        assert limit is None or 1 <= len(rows) <= limit

    _with_file(content, check)


config_keys = st.sampled_from(
    [
        "iterations",
        "seed",
        "out_dir",
        "report_to",
        "model.policy",
        "model.dtype",
        "sampling",
        "sampling.temperature",
        "sampling.top_p",
        "sampling.max_new_tokens",
        "train.learning_rate",
        "train.adam_betas",
        "train.max_grad_norm",
        "train.kl_direction",
        "pool.drop_factor",
        "pool.num_quantiles",
        "reward.options",
        "reward.options.tokenizer",
        "eval",
        "nope",
        "a.b.c",
        "",
    ]
)
config_values = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            ".nan",
            ".inf",
            "-.inf",
            "nan",
            "1e999",
            "-1",
            "0",
            "1e-5",
            "[0.9, 0.99]",
            "[",
            "{a: 1}",
            "null",
            "true",
            "2001-02-30",
            "&a [*a]",
            "!!python/name:os.system",
            "10" * 30,
        ]
    ),
)
overrides = st.one_of(
    st.text(max_size=20),
    st.tuples(config_keys, config_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
)


@FAST
@given(st.lists(overrides, max_size=4))
def test_load_config_with_any_overrides_is_valid_or_user_error(items: list[str]) -> None:
    try:
        config = load_config(None, items)
    except UserError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(config, Config)
    for section in ("sampling", "train"):
        for value in config_to_dict(config)[section].values():
            if isinstance(value, float):
                assert math.isfinite(value)
    assert config.sampling.temperature > 0 and config.train.learning_rate > 0


rewards_lists = st.lists(st.none() | st.floats(allow_nan=True, allow_infinity=True), max_size=30)


@FAST
@given(rewards_lists, st.integers(min_value=1, max_value=8))
def test_quantiles_are_a_valid_monotone_bucketing(rewards: list, k: int) -> None:
    out = assign_quantiles(rewards, k)
    assert len(out) == len(rewards)
    usable = [j for j, r in enumerate(rewards) if r is not None and math.isfinite(r)]
    # None exactly where the reward is missing or not finite; buckets in [0, K).
    assert [j for j, q in enumerate(out) if q is not None] == usable
    assert all(0 <= out[j] < k for j in usable)
    # A strictly higher reward never gets a worse (larger) bucket.
    for a in usable:
        for b in usable:
            if rewards[a] > rewards[b]:
                assert out[a] <= out[b]
    # Buckets 0..K-2 hold floor(m/K) each; the rest is in K-1 (ALT's rule).
    m, size = len(usable), len(usable) // k
    counts = [sum(1 for j in usable if out[j] == q) for q in range(k)]
    assert counts[:-1] == [size] * (k - 1) and counts[-1] == m - size * (k - 1)


@FAST
@given(st.lists(rewards_lists, max_size=5), st.integers(min_value=1, max_value=6))
def test_scoped_quantiles_keep_group_shapes(groups: list, k: int) -> None:
    for scope in ("prompt", "global"):
        out = assign_quantiles_scoped(groups, k, scope)
        assert [len(g) for g in out] == [len(g) for g in groups]
    flat = assign_quantiles([r for g in groups for r in g], k)
    assert [q for g in assign_quantiles_scoped(groups, k, "global") for q in g] == flat
