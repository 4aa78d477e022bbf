"""The data pool: the generations kept for training, grouped by raw prompt.

The algorithm is in `docs/algorithm.md` section 4. One class for every variant, where ALT has a
pickled pool class per variant whose copies drifted apart (`docs/algorithm.md` section 15 item 4):
it buckets only through `assign_quantiles_scoped` and saves as samples JSONL (a pool file is a
samples file). A prompt seen again holds generations of several iterations, so each one's is in
`extra["iterations"]`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from alignment.errors import UserError
from alignment.quantiles import QuantileScope, assign_quantiles_scoped
from alignment.records import FinishReason, SampleRecord, load_samples, save_samples

ITERATIONS_KEY = "iterations"
# Every per-generation list of a pool record; add, flush and draw keep them aligned.
_COLUMNS = ("generations", "rewards", "quantiles", "feedback", "finish_reasons", ITERATIONS_KEY)


@dataclass(frozen=True)
class TrainItem:
    """One drawn generation with what the trainer conditions on; `prompt` is raw (unconditioned)."""

    prompt: str
    generation: str
    quantile: int
    finish_reason: FinishReason | None
    reward: float | None
    feedback: str | None = None


class DataPool:
    """Per-prompt generations keyed by the raw prompt string, in first-seen prompt order.

    ALT's per-iteration update (`alt/data_pool.py:103-125`) is `flush`, `add`, `requantize`.
    """

    def __init__(self, records: Iterable[SampleRecord] = ()) -> None:
        self._records: dict[str, SampleRecord] = {}
        self.add(records)

    def __len__(self) -> int:  # generations, not prompts
        return sum(len(r.generations) for r in self._records.values())

    @property
    def records(self) -> list[SampleRecord]:
        """One record per prompt, first-seen order; the live objects, so treat them as read-only."""
        return list(self._records.values())

    def add(self, records: Iterable[SampleRecord]) -> None:
        """Add copies of `records`; a prompt already present gets the new generations appended.

        A field only one side has is padded with None, or "length" for finish reasons (the format
        has no null reason; `draw` treats unknown as "length" anyway). Quantiles of appended items
        stay as given until `requantize`, as in ALT (`alt/data_pool.py:103-125`).
        """
        for record in records:
            new = _normalize(record)
            old = self._records.get(new.prompt)
            self._records[new.prompt] = new if old is None else _concat(old, new)

    def flush(self, drop_factor: float, rng: random.Random) -> None:
        """Drop old data before an add, with ALT's semantics (`alt/data_pool.py:21-66`).

        0 keeps everything, 1 empties the pool; otherwise `int(len_k * (1 - drop_factor))` random
        items are kept per quantile k of each prompt (no-quantile items form one more group), so
        what is kept stays spread over the quantiles. Kept items keep their order and every field
        (ALT's LMU pool lets its scores fall out of step here, `docs/algorithm.md` section 15
        item 4); emptied prompts are removed.
        """
        if not 0.0 <= drop_factor <= 1.0:
            raise ValueError(f"drop_factor must be in [0, 1], got {drop_factor}")
        if drop_factor == 1.0:
            self._records.clear()
        if drop_factor in (0.0, 1.0):
            return
        kept: dict[str, SampleRecord] = {}
        for prompt, record in self._records.items():
            quantiles = record.quantiles or [None] * len(record.generations)
            groups: dict[int | None, list[int]] = {}
            for j, q in enumerate(quantiles):
                groups.setdefault(q, []).append(j)
            keep: list[int] = []
            for members in groups.values():  # first-appearance order: deterministic for a seed
                keep += rng.sample(members, int(len(members) * (1.0 - drop_factor)))
            if keep:
                kept[prompt] = _subset(record, sorted(keep))
        self._records = kept

    def requantize(self, num_quantiles: int, scope: QuantileScope = "prompt") -> None:
        """Recompute every quantile from the rewards: per prompt (ALT) or over the pool (Quark)."""
        groups = [r.rewards or [None] * len(r.generations) for r in self.records]
        buckets = assign_quantiles_scoped(groups, num_quantiles, scope)
        for record, quantiles in zip(self.records, buckets, strict=True):
            record.quantiles = quantiles

    def draw(
        self, num_per_quantile: int, num_quantiles: int, rng: random.Random
    ) -> list[TrainItem]:
        """The balanced training set: up to `num_per_quantile` items per prompt and quantile.

        For each prompt and quantile the items are shuffled with `rng`; those the sampler ended
        with "stop" are taken first, then the rest ("length"/unknown) in the same shuffled order.
        ALT tests "< 64 GPT-J tokens" instead (ALT `alt/data_pool.py:127-191`), which ties the
        rule to one tokenizer and one length limit (`docs/algorithm.md` section 15 item 5).
        Items without a quantile (missing reward) are never drawn.

        Returns items in prompt order, then quantile order (0 = best), the same for the same
        seed. Raises ValueError if a stored quantile is outside [0, num_quantiles) (another K).
        """
        if num_per_quantile < 1 or num_quantiles < 1:
            raise ValueError("num_per_quantile and num_quantiles must be >= 1")
        items: list[TrainItem] = []
        for record in self._records.values():
            quantiles = record.quantiles or []  # never bucketed: nothing to draw
            if any(q is not None and not 0 <= q < num_quantiles for q in quantiles):
                raise ValueError(f"a quantile is outside [0, {num_quantiles}): requantize first")
            prompt, gens, n = record.prompt, record.generations, len(record.generations)
            reasons: list[Any] = record.finish_reasons or [None] * n
            rewards, feedback = record.rewards or [None] * n, record.feedback or [None] * n
            for q in range(num_quantiles):
                members = [j for j, q_j in enumerate(quantiles) if q_j == q]
                rng.shuffle(members)
                finished = [j for j in members if reasons[j] == "stop"]
                rest = [j for j in members if reasons[j] != "stop"]
                chosen = (finished + rest)[:num_per_quantile]
                items += [
                    TrainItem(prompt, gens[j], q, reasons[j], rewards[j], feedback[j])
                    for j in chosen
                ]
        return items

    def save(self, path: str | Path) -> int:
        """Write the pool as samples JSONL (atomic; JSON, never pickle); return the record count."""
        return save_samples(path, self.records)

    @classmethod
    def load(cls, path: str | Path) -> DataPool:
        """Read a pool (or any samples file; repeated prompts are merged as by `add`)."""
        return cls(load_samples(path))


def _columns(record: SampleRecord) -> dict[str, Any]:
    """The per-generation lists of a record, by name (absent = None)."""
    cols: dict[str, Any] = {name: getattr(record, name) for name in _COLUMNS[:-1]}
    cols[ITERATIONS_KEY] = record.extra.get(ITERATIONS_KEY)
    return cols


def _with_columns(record: SampleRecord, cols: dict[str, Any]) -> SampleRecord:
    """A copy of `record` with these lists; iterations go to `extra` only if any is known."""
    extra = {k: v for k, v in record.extra.items() if k != ITERATIONS_KEY}
    iterations = cols.pop(ITERATIONS_KEY)
    if iterations is not None and any(i is not None for i in iterations):
        extra[ITERATIONS_KEY] = iterations
    return replace(record, extra=extra, **cols)


def _normalize(record: SampleRecord) -> SampleRecord:
    """A checked copy: aligned lengths, rewards as Python floats (non-finite -> None, as JSON)."""
    n, where = len(record.generations), f"prompt {record.prompt[:40]!r}"
    iterations = record.extra.get(ITERATIONS_KEY, [record.iteration] * n)
    if not isinstance(iterations, list) or not all(i is None or type(i) is int for i in iterations):
        raise UserError(f"{where}: '{ITERATIONS_KEY}' must be a list of integers or nulls")
    cols = {k: None if v is None else list(v) for k, v in _columns(record).items()}
    cols[ITERATIONS_KEY] = list(iterations)
    for name, value in cols.items():
        if value is not None and len(value) != n:
            raise UserError(f"{where}: '{name}' has {len(value)} entries but 'generations' has {n}")
    if cols["rewards"] is not None:
        cols["rewards"] = [
            float(r) if r is not None and math.isfinite(r) else None for r in cols["rewards"]
        ]
    return _with_columns(record, cols)


def _concat(old: SampleRecord, new: SampleRecord) -> SampleRecord:
    """`old` followed by `new` (same prompt); the newest iteration and the first id win."""
    a, b = _columns(old), _columns(new)
    n_old, n_new = len(old.generations), len(new.generations)
    cols: dict[str, Any] = {}
    for name in _COLUMNS:
        fill = "length" if name == "finish_reasons" else None
        either = (a[name], b[name]) != (None, None)
        cols[name] = (a[name] or [fill] * n_old) + (b[name] or [fill] * n_new) if either else None
    first_id = old.id if old.id is not None else new.id
    newest = new.iteration if new.iteration is not None else old.iteration
    merged = replace(old, id=first_id, iteration=newest, extra={**new.extra, **old.extra})
    return _with_columns(merged, cols)


def _subset(record: SampleRecord, keep: list[int]) -> SampleRecord:
    """The record restricted to the generations `keep` (sorted), each field kept aligned."""
    cols = {k: None if v is None else [v[j] for j in keep] for k, v in _columns(record).items()}
    return _with_columns(record, cols)
