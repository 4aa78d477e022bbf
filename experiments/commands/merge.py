"""`quark-alt merge SHARD... --out F`: the shard files of a `--shard i/n` fan-out, as one file.

`quark-alt sample` and `quark-alt score` take `--shard i/n` so an array job can split a prompt set
over machines; this is the step that joins their outputs, checking that every prompt is there
exactly once (with `--prompts`, that they are exactly the prompt set's).
"""

from __future__ import annotations

import argparse

from alignment.prompts import load_prompts
from alignment.records import iter_samples, merge_shards, save_samples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shard files in shard order (0/n, 1/n, ...)")
    parser.add_argument("--out", required=True, help="merged samples JSONL to write")
    parser.add_argument(
        "--prompts", help="the prompt set the shards were made from: every prompt exactly once"
    )
    parser.add_argument("--limit", type=int, help="as given to sample: the first N prompts")


def run(args: argparse.Namespace) -> int:
    shards = [(path, list(iter_samples(path))) for path in args.shards]
    # ALT's own files carry no ids: their prompts are then matched by text
    by_id = all(record.id is not None for _, lines in shards for _, record in lines)
    expected = None
    if args.prompts:
        rows = load_prompts(args.prompts, limit=args.limit)
        expected = [row.id if by_id else row.prompt for row in rows]
    records = merge_shards(shards, expected, by_id)
    save_samples(args.out, records)
    print(f"merged {len(records)} prompts from {len(shards)} shard(s) into {args.out}")
    return 0
