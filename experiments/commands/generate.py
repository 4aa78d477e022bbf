"""`quark-alt generate`: inference, conditioned on the best control when the model has one."""

from __future__ import annotations

import argparse
import json

from alignment.errors import UserError
from alignment.models import load_model_and_tokenizer
from alignment.prompts import load_prompts
from experiments.commands.common import (
    add_placement_argument,
    add_sampling_arguments,
    model_conditioning,
    sampling_config,
)
from samplers import make_sampler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="hub id, local path, checkpoint folder or embedded: name")
    parser.add_argument("prompts", nargs="*", help="prompt texts")
    parser.add_argument("--input", help="prompt set (JSONL) instead of prompt texts")
    parser.add_argument("--no-condition", action="store_true", help="do not add the best control")
    add_placement_argument(parser)
    parser.add_argument("-k", "--num-samples", type=int, default=1)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.input:
        prompts = [row.prompt for row in load_prompts(args.input)]
    else:
        prompts = args.prompts
    if not prompts:
        raise UserError("give prompt texts or --input FILE")
    if any(not p.strip() for p in prompts):
        raise UserError("a prompt is empty")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=args.device)
    conditioning = (
        None if args.no_condition else model_conditioning(args.model, tokenizer, args.placement)
    )
    texts = [conditioning.condition(p) if conditioning else p for p in prompts]
    sampler = make_sampler(model, tokenizer, sampling_config(args))
    outputs = sampler.sample(texts, args.num_samples, seed=args.seed, greedy=args.greedy)
    for prompt, gens in zip(prompts, outputs, strict=True):
        for gen in gens:
            if args.json:
                print(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "generation": gen.text,
                            "finish_reason": gen.finish_reason,
                        },
                        ensure_ascii=False,
                    )
                )
            else:
                print(gen.text)
    return 0
