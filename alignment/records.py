"""The samples file: one JSON line per prompt, in the layout ALT's own scripts read and write.

`{"prompt", "generations", "rewards"}` is ALT's own format, so its files load unchanged; `id`,
`quantiles`, `feedback`, `finish_reasons` and `iteration` are ours and optional. Fields we do not
know are kept and written back, so a round trip through any command loses nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignment.errors import UserError
from alignment.io import read_jsonl, write_jsonl

FinishReason = Literal["stop", "length"]
_OPTIONAL_FIELDS = (
    "rewards",
    "quantiles",
    "feedback",
    "finish_reasons",
    "iteration",
    "raw_rewards",
    "reference_reward",
)
# the fields SampleRecord reads; any other key is kept in `extra` and written back
KNOWN_FIELDS = ("id", "prompt", "generations", *_OPTIONAL_FIELDS)


@dataclass
class SampleRecord:
    """All generations for one raw (never conditioned) prompt, with whatever is known about them."""

    prompt: str
    generations: list[str]
    id: str | None = None
    rewards: list[float | None] | None = None
    quantiles: list[int | None] | None = None
    feedback: list[str | None] | None = None
    finish_reasons: list[FinishReason] | None = None
    iteration: int | None = None
    raw_rewards: list[float | None] | None = None
    """With `reward.subtract_reference`: the rewards before the reference's was subtracted."""
    reference_reward: float | None = None
    """With `reward.subtract_reference`: the reward of the prompt's reference summary."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompt, "generations": self.generations}
        if self.id is not None:
            row = {"id": self.id, **row}
        for name in _OPTIONAL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                # NaN is not JSON: a non-finite reward is stored as missing.
                if name in ("rewards", "raw_rewards"):
                    value = [_finite_or_none(r) for r in value]
                elif name == "reference_reward":
                    value = _finite_or_none(value)
                row[name] = value
        row.update(self.extra)
        return row

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "<record>") -> SampleRecord:
        """Validate one parsed line; `where` ("file:line") prefixes every error."""
        prompt = obj.get("prompt")
        if not isinstance(prompt, str):
            raise UserError(f"{where}: field 'prompt' is missing or not a string")
        if not prompt.strip():
            raise UserError(f"{where}: field 'prompt' is empty")
        gens = obj.get("generations")
        if not isinstance(gens, list) or not all(isinstance(g, str) for g in gens):
            raise UserError(f"{where}: field 'generations' must be a list of strings")
        if not gens:
            raise UserError(f"{where}: field 'generations' is empty")
        record = cls(
            prompt=prompt,
            generations=gens,
            extra={k: v for k, v in obj.items() if k not in KNOWN_FIELDS},
        )
        if obj.get("id") is not None:
            record.id = str(obj["id"])
        if obj.get("iteration") is not None:
            if not isinstance(obj["iteration"], int):
                raise UserError(f"{where}: field 'iteration' must be an integer")
            record.iteration = obj["iteration"]
        if obj.get("reference_reward") is not None:
            if not _is_reward(obj["reference_reward"]):
                raise UserError(f"{where}: field 'reference_reward' must be a number")
            record.reference_reward = _reward_value(obj["reference_reward"])
        for name, check in (
            ("rewards", _is_reward),
            ("raw_rewards", _is_reward),
            ("quantiles", _is_opt_int),
            ("feedback", _is_opt_str),
            ("finish_reasons", _is_finish),
        ):
            value = obj.get(name)
            if value is None:
                continue
            if not isinstance(value, list) or not all(check(v) for v in value):
                raise UserError(f"{where}: field '{name}' has a value of the wrong type")
            if len(value) != len(gens):
                raise UserError(
                    f"{where}: field '{name}' has {len(value)} entries but "
                    f"'generations' has {len(gens)}"
                )
            if name in ("rewards", "raw_rewards"):
                value = [_reward_value(v) for v in value]
            setattr(record, name, value)
        return record


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _is_reward(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def _reward_value(v: float | int | None) -> float | None:
    """A stored reward as float; NaN/Infinity (Python's json reads them) become missing, as
    `to_json` writes them, so a file holding them is never ranked on or summed into a crash."""
    if v is None:
        return None
    try:
        value = float(v)
    except OverflowError:  # an integer too large for a float is no usable reward either
        return None
    return value if math.isfinite(value) else None


def _is_opt_int(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _is_opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _is_finish(v: Any) -> bool:
    return v in ("stop", "length")


def iter_samples(path: str | Path) -> Iterator[tuple[int, SampleRecord]]:
    """Yield (line number, record); every error names the file and the line."""
    for lineno, obj in read_jsonl(path):
        yield lineno, SampleRecord.from_json(obj, where=f"{path}:{lineno}")


def load_samples(path: str | Path) -> list[SampleRecord]:
    return [record for _, record in iter_samples(path)]


def save_samples(path: str | Path, records: list[SampleRecord]) -> int:
    return write_jsonl(path, (r.to_json() for r in records))


def merge_shards(
    shards: list[tuple[str, list[tuple[int, SampleRecord]]]],
    expected: list[str] | None = None,
    by_id: bool = True,
) -> list[SampleRecord]:
    """One record list from the shard files of a `--shard i/n` fan-out, each prompt exactly once.

    `shards` holds (path, [(line number, record)]) in shard order i = 0..n-1. A prompt is known
    by its record id, or (`by_id=False`, for ALT's id-less files) by its text. The result is in
    `expected` order (the prompt set's ids or texts) when given, and otherwise interleaved back
    into the order the prompts had before `--shard` dealt them out (shard i took i, i + n, ...).
    A prompt in two shards, a prompt missing from `expected`, or one not in it is an error naming
    the files and lines involved: a cluster job that died or ran twice must not pass unnoticed.
    """
    seen: dict[str, str] = {}
    by_key: dict[str, SampleRecord] = {}
    for path, lines in shards:
        for lineno, record in lines:
            key = record.id if by_id and record.id is not None else record.prompt
            where = f"{path}:{lineno}"
            if key in seen:
                raise UserError(f"{where}: prompt {key!r} is also in {seen[key]}")
            seen[key] = where
            by_key[key] = record
    if expected is None:
        columns = [[record for _, record in lines] for _, lines in shards]
        return [
            col[row]
            for row in range(max(map(len, columns), default=0))
            for col in columns
            if row < len(col)
        ]
    missing = [key for key in expected if key not in by_key]
    if missing:
        listed = ", ".join(repr(k) for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UserError(f"{len(missing)} prompt(s) of the prompt set are in no shard: {listed}")
    wanted = set(expected)
    stray = [where for key, where in seen.items() if key not in wanted]
    if stray:
        raise UserError(f"{stray[0]}: this prompt is not in the prompt set ({len(stray)} such)")
    return [by_key[key] for key in expected]
