"""Evaluation's teacher-forced log-probabilities: prompt-shared against the plain forward.

A speed measurement, not a test. `evaluation.likelihood_terms` scores every eval sample under
the policy and the reference (`trainer.target_logprobs`); the samples come K per prompt, in a
row. Two ways with the same weights and batches:

- **plain**: the same function with `trainer.collate` + `target_logits` as its forward
  (`bench_iteration.plain_target_logits`), every sample's whole prompt run again;
- **shared**: `trainer.target_logprobs` as shipped, each batch's prompts run once
  (`prefix_sharing.shared_prefix_target_logits`), only the targets per sample.

Workload: the first N posts of the validation split (`experiments/data/tldr_validation.jsonl`),
cut as `make compare` cuts them (256 tokens, 48 kept at the end), K = 4 summaries each (the
human TL;DR, its first half, the post's first 30 words, its first 10), batch 8 as the loop's
eval uses. The two ways alternate over repeats; the speedup is the median of per-repeat ratios,
and every log-probability is checked to agree.

    .venv/bin/python benchmarks/bench_likelihood.py [--num-posts 16 --repeats 3 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from bench_iteration import plain_target_logits

from alignment import trainer
from alignment.config import SamplingConfig
from alignment.io import atomic_write
from alignment.models import load_model_and_tokenizer
from alignment.prompts import load_prompts
from alignment.trainer import encode_prompt, encode_target, target_logprobs

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "experiments" / "data" / "tldr_validation.jsonl"


def workload(tokenizer, num_posts: int) -> tuple[list[list[int]], list[list[int]]]:
    """K = 4 targets per post, prompt-major, tokenized as the eval tokenizes them."""
    sampling = SamplingConfig(max_new_tokens=40, max_prompt_tokens=256, keep_tail_tokens=48)
    prompts, targets = [], []
    for row in load_prompts(DATA, limit=num_posts):
        words = (row.reference or "").split()
        post = row.prompt.split()
        for text in (words, words[: len(words) // 2], post[:30], post[:10]):
            prompts.append(encode_prompt(tokenizer, row.prompt, sampling))
            targets.append(encode_target(tokenizer, " " + " ".join(text), False, 40))
    return prompts, targets


def plain_logprobs(model, prompts, targets, pad: int, batch_size: int) -> list[torch.Tensor]:
    """`target_logprobs` with its forward swapped for the plain one, so the two ways differ in
    nothing else (`bench_iteration.plain_target_logits`)."""
    with mock.patch.object(trainer, "shared_prefix_target_logits", plain_target_logits):
        return target_logprobs(model, prompts, targets, pad, batch_size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--num-posts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "likelihood.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32", device="cpu")
    model.eval()
    prompts, targets = workload(tokenizer, args.num_posts)
    pad = tokenizer.pad_token_id
    ways = {
        "plain": lambda: plain_logprobs(model, prompts, targets, pad, args.batch_size),
        "shared": lambda: target_logprobs(model, prompts, targets, pad, args.batch_size),
    }
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    results = {}
    for repeat in range(args.repeats):
        for name in ways if repeat % 2 == 0 else reversed(list(ways)):
            start = time.perf_counter()
            results[name] = ways[name]()
            seconds[name].append(time.perf_counter() - start)
            print(f"repeat {repeat} {name:6s} {seconds[name][-1]:7.2f} s", flush=True)
    diff = max(
        (a - b).abs().max().item() for a, b in zip(results["plain"], results["shared"], strict=True)
    )
    ratios = [a / b for a, b in zip(seconds["plain"], seconds["shared"], strict=True)]
    report = {
        "benchmark": "teacher-forced log-probabilities of eval samples, shared prompt vs plain",
        "samples": len(prompts),
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "target_tokens_mean": sum(map(len, targets)) / len(targets),
        "batch_size": args.batch_size,
        "seconds": seconds,
        "speedup_per_repeat": [round(r, 2) for r in ratios],
        "speedup_median": round(statistics.median(ratios), 2),
        "max_abs_logprob_difference": diff,
        "machine": {"threads": torch.get_num_threads(), "python": platform.python_version()},
    }
    with atomic_write(args.out) as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "seconds"}, indent=1))


if __name__ == "__main__":
    main()
