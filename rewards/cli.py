"""`quark-alt score`: samples JSONL in, the same lines plus `rewards` and `quantiles` out.

Every input line is validated before the reward model loads, so a malformed file fails in
seconds and leaves no output. The output is only ever replaced whole (temp file + rename):
either the old file or the new one exists, never half of one. An interrupted run (Ctrl-C, or
a crash after a periodic save) leaves a valid partial file that `--resume` completes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from alignment.conditioning import strip_condition
from alignment.config import PoolConfig
from alignment.errors import UserError
from alignment.io import parse_shard
from alignment.quantiles import assign_quantiles_scoped
from alignment.records import SampleRecord, iter_samples, save_samples
from rewards import Reward, load_reward
from rewards.base import check_scores

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reward",
        required=True,
        help="embedded, MODULE:FUNCTION, "
        "value-head:BACKBONE:WEIGHTS, or a classifier hub id / folder; "
        "MODULE:FUNCTION (or FILE.py:FUNCTION) imports and runs that Python code: "
        "arbitrary code by design, so name only code you trust",
    )
    parser.add_argument("--input", required=True, help="samples JSONL (ALT format works)")
    parser.add_argument("--output", required=True, help="scored samples JSONL to write")
    parser.add_argument(
        "--num-quantiles", type=int, default=PoolConfig.num_quantiles, help="K buckets, 0 = best"
    )
    parser.add_argument(
        "--scope",
        choices=["prompt", "global"],
        default=PoolConfig.scope,
        help="rank within each prompt (ALT) or over the whole file (Quark)",
    )
    parser.add_argument("--shard", default="0/1", help="i/n: score the lines with index %% n == i")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the lines already in --output, score only the rest",
    )
    parser.add_argument("--batch-size", type=int, help="generations per forward pass")
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda if present)")
    parser.add_argument(
        "--reward-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, e.g. label=POSITIVE or tokenizer=EleutherAI/gpt-j-6b",
    )
    parser.add_argument(
        "--save-every",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="rewrite the partial output this often, for --resume",
    )


def run(args: argparse.Namespace) -> int:
    if args.num_quantiles < 1:
        raise UserError(f"--num-quantiles must be >= 1, got {args.num_quantiles}")
    index, count = parse_shard(args.shard)
    options = reward_options(args.reward_arg)
    for name in ("batch_size", "device"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)

    records = [r for i, (_, r) in enumerate(iter_samples(args.input)) if i % count == index]
    if not records and count == 1:
        raise UserError(f"{args.input}: no sample lines")
    if args.scope == "global" and count > 1:
        log.warning("--scope global with --shard: quantiles rank this shard's lines only")
    done = previous_output(args.output, records) if args.resume else {}
    todo = [i for i in range(len(records)) if i not in done]
    log.info("%d lines to score, %d kept from %s", len(todo), len(done), args.output)

    rows: dict[int, SampleRecord] = dict(done)
    non_finite = 0
    if todo:
        reward = load_reward(args.reward, **options)
        try:
            non_finite = score_lines(records, todo, reward, rows, args)
        except KeyboardInterrupt:
            write_output(args.output, rows, args)
            log.warning(
                "interrupted: %d of %d lines saved; rerun with --resume", len(rows), len(records)
            )
            return 130
    write_output(args.output, rows, args)
    print(summary(rows.values(), args.output, kept=len(done), non_finite=non_finite))
    return 0


def score_lines(
    records: list[SampleRecord],
    todo: list[int],
    reward: Reward,
    rows: dict[int, SampleRecord],
    args: argparse.Namespace,
) -> int:
    """Score lines `todo` into `rows`, saving every --save-every seconds; return the non-finite
    count. Lines go to the reward ~256 generations at a time: enough to batch by length."""
    non_finite = 0
    last_save = time.monotonic()
    total = sum(len(records[i].generations) for i in todo)
    with tqdm(total=total, unit="gen", desc="scoring", disable=None) as progress:
        for chunk in chunks(todo, records, target=256):
            non_finite += score_records([records[i] for i in chunk], reward)
            rows.update((i, records[i]) for i in chunk)
            progress.update(sum(len(records[i].generations) for i in chunk))
            if time.monotonic() - last_save > args.save_every:
                write_output(args.output, rows, args)
                last_save = time.monotonic()
    return non_finite


def reward_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> options; a VALUE that parses as JSON (1, 0.5, true) is typed."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--reward-arg must look like KEY=VALUE, got {pair!r}")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    return options


def line_keys(records: list[SampleRecord]) -> list[Hashable]:
    """A unique key per line: (id or prompt, how many earlier lines had the same one).

    Ids are not unique in practice (`sample` copies them from the prompt file), so the occurrence
    count is part of the key for ids too: every key then names exactly one line, and the n-th
    line with an id in the output can only match the n-th line with that id in the input.
    """
    seen: Counter[tuple[str, str]] = Counter()
    keys: list[Hashable] = []
    for record in records:
        name = ("id", record.id) if record.id is not None else ("prompt", record.prompt)
        keys.append((*name, seen[name]))
        seen[name] += 1
    return keys


def previous_output(path: str, records: list[SampleRecord]) -> dict[int, SampleRecord]:
    """Lines of an earlier (partial) output that match input lines, by input position.

    A line is kept only if its key names exactly one input line and its prompt and generations
    equal that line's: anything else would put rewards next to text they were not computed for.
    """
    if not Path(path).is_file():
        return {}
    position = {key: i for i, key in enumerate(line_keys(records))}
    old = [(lineno, r) for lineno, r in iter_samples(path)]
    done: dict[int, SampleRecord] = {}
    for (lineno, record), key in zip(old, line_keys([r for _, r in old]), strict=True):
        if key not in position:
            raise UserError(
                f"{path}:{lineno}: this line is not in the input shard; "
                "delete the output or drop --resume"
            )
        source = records[position[key]]
        for field, differ in (("prompt", "prompt differs"), ("generations", "generations differ")):
            if getattr(record, field) != getattr(source, field):
                raise UserError(
                    f"{path}:{lineno}: {differ} from the input line; "
                    "delete the output or drop --resume"
                )
        if record.rewards is not None:
            done[position[key]] = record
    return done


def chunks(todo: list[int], records: list[SampleRecord], target: int) -> list[list[int]]:
    """Consecutive lines holding about `target` generations each."""
    out: list[list[int]] = [[]]
    size = 0
    for i in todo:
        if size >= target:
            out.append([])
            size = 0
        out[-1].append(i)
        size += len(records[i].generations)
    return out


def score_records(records: list[SampleRecord], reward: Reward) -> int:
    """Set `rewards` on each record (NaN/inf become None); return how many were non-finite."""
    prompts = [strip_condition(r.prompt) for r in records for _ in r.generations]
    completions = [g for r in records for g in r.generations]
    scores = check_scores(reward.score(prompts, completions), len(completions), reward.name)
    non_finite = sum(1 for s in scores if s is not None and not math.isfinite(s))
    start = 0
    for record in records:
        part = scores[start : start + len(record.generations)]
        record.rewards = [s if s is not None and math.isfinite(s) else None for s in part]
        start += len(record.generations)
    return non_finite


def write_output(path: str, rows: dict[int, SampleRecord], args: argparse.Namespace) -> None:
    """Recompute quantiles over every line (global scope needs them all) and replace the file."""
    ordered = [rows[i] for i in sorted(rows)]
    groups = [r.rewards or [None] * len(r.generations) for r in ordered]
    for record, quantiles in zip(
        ordered, assign_quantiles_scoped(groups, args.num_quantiles, args.scope), strict=True
    ):
        record.quantiles = quantiles
    save_samples(path, ordered)


def summary(records: Iterable[SampleRecord], output: str, *, kept: int, non_finite: int) -> str:
    lines = list(records)
    rewards = [r for line in lines for r in (line.rewards or [])]
    finite = [r for r in rewards if r is not None and math.isfinite(r)]
    mean = statistics.fmean(finite) if finite else float("nan")
    std = statistics.pstdev(finite) if finite else float("nan")
    return (
        f"scored {output}: {len(lines)} lines ({kept} kept from before), "
        f"{sum(len(line.generations) for line in lines)} generations; "
        f"reward mean {mean:.4f} std {std:.4f}; "
        f"non-finite {non_finite}, missing {len(rewards) - len(finite)} (stored as null)"
    )
