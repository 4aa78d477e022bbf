"""`quark-alt sample`: prompts file -> samples JSONL (the ALT-compatible format of `records.py`)."""

from __future__ import annotations

import argparse

from alignment.config import SamplingConfig
from alignment.errors import UserError
from alignment.io import parse_shard
from alignment.models import load_model_and_tokenizer
from alignment.prompts import load_prompts
from alignment.records import SampleRecord, save_samples
from experiments.commands.common import (
    add_placement_argument,
    add_sampling_arguments,
    model_conditioning,
    sampling_config,
)
from samplers import make_sampler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="hub id, local path or embedded: name")
    parser.add_argument("--prompts", required=True, help="prompt set (JSONL)")
    parser.add_argument("--out", required=True, help="samples JSONL to write")
    parser.add_argument("-k", "--num-samples", type=int, default=4, help="generations per prompt")
    parser.add_argument(
        "--condition",
        choices=["best", "none"],
        default="best",
        help="condition on the best control when the model was trained with one (default)",
    )
    add_placement_argument(parser)
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--shard", default="0/1", help="i/n: take every n-th prompt from i")
    parser.add_argument("--iteration", type=int, help="stored in each record")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.limit is not None and args.limit < 1:
        # A slice would turn -2 into "all but the last two" and 0 into an empty run.
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    index, count = parse_shard(args.shard)
    cfg: SamplingConfig = sampling_config(args)
    prompts = load_prompts(args.prompts, limit=args.limit)
    rows = prompts[index::count]
    if not rows:
        # Checked before the model loads; the sampler cannot batch zero prompts.
        raise UserError(
            f"{args.prompts}: shard {args.shard} of {len(prompts)} prompt(s) is empty; "
            "use fewer shards"
        )
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    conditioning = (
        model_conditioning(args.model, tokenizer, args.placement)
        if args.condition == "best"
        else None
    )
    texts = [conditioning.condition(r.prompt) if conditioning else r.prompt for r in rows]
    sampler = make_sampler(model, tokenizer, cfg)
    generations = sampler.sample(texts, args.num_samples, seed=args.seed)
    records = [
        SampleRecord(
            prompt=row.prompt,
            id=row.id,
            iteration=args.iteration,
            generations=[g.text for g in gens],
            finish_reasons=[g.finish_reason for g in gens],
        )
        for row, gens in zip(rows, generations, strict=True)
    ]
    save_samples(args.out, records)
    total = sum(len(r.generations) for r in records)
    stopped = sum(r.finish_reasons.count("stop") for r in records if r.finish_reasons)
    print(
        f"wrote {len(records)} prompts x {args.num_samples} = {total} generations "
        f"({stopped} stopped, {total - stopped} cut at {cfg.max_new_tokens} tokens) "
        f"to {args.out}"
    )
    return 0
