"""Scoring throughput: length-bucketed batches vs unsorted fixed batches vs the plain way.

Workload: real TL;DR posts from shared/data/tldr_dev.jsonl, each with K summaries (the human
TL;DR and perturbations of it), scored by the embedded MiniLM reward. Three ways, same weights:

- plain: what a first script does: consecutive fixed batches, each tokenized with padding=True,
  the post embedded again for every generation;
- unsorted: rewards.embedded with length sorting off (posts embedded once per prompt);
- bucketed: rewards.embedded as shipped (posts once, batches sorted by token length).

Modes run interleaved, `--repeats` times each, and the best time counts (the least disturbed by
other load on the machine). Run from the repository root:

    .venv/bin/python benchmarks/bench_scoring.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from alignment.io import atomic_write
from alignment.prompts import tldr_prompt
from rewards.base import length_batches
from rewards.embedded import EmbeddedSummaryReward, summary_reward
from rewards.functions import post_body

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tldr_dev.jsonl"


def workload(path: Path, num_posts: int) -> tuple[list[str], list[str]]:
    """K = 4 summaries per post: human, its first half, the post's lead, a looped phrase."""
    rows = [json.loads(line) for line in path.read_text().splitlines()[:num_posts]]
    prompts, completions = [], []
    for row in rows:
        summary, words = row["summary"], row["summary"].split()
        for text in (
            summary,
            " ".join(words[: max(1, len(words) // 2)]),
            " ".join(row["post"].split()[:40]),
            " ".join(words[:4] * 10),
        ):
            prompts.append(tldr_prompt(row["subreddit"], row["title"], row["post"]))
            completions.append(" " + text)
    return prompts, completions


def plain_scores(reward: EmbeddedSummaryReward, prompts: list[str], completions: list[str]):
    """The plain transformers way: fixed consecutive batches, padding=True, no post reuse."""
    out = []
    for start in range(0, len(prompts), reward.batch_size):
        posts = [post_body(p) for p in prompts[start : start + reward.batch_size]]
        summaries = [c.strip() for c in completions[start : start + reward.batch_size]]
        post_rows = _embed_padded(reward, posts, reward.post_max_length)
        summary_rows = _embed_padded(reward, summaries, reward.summary_max_length)
        similarity = (post_rows * summary_rows).sum(-1).tolist()
        out += [
            summary_reward(sim, s, p, reward.weights)
            for sim, s, p in zip(similarity, summaries, posts, strict=True)
        ]
    return out


def _embed_padded(reward: EmbeddedSummaryReward, texts: list[str], max_length: int):
    batch = reward.tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(reward.device)
    with torch.inference_mode():
        hidden = reward.encoder(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu()


def padding_share(reward: EmbeddedSummaryReward, texts: list[str], max_length: int, sort: bool):
    """Fraction of the encoder's token slots that are padding, for one batching scheme."""
    lengths = [
        len(ids)
        for ids in reward.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    ]
    slots = sum(
        len(b) * max(lengths[i] for i in b)
        for b in length_batches(lengths, reward.batch_size, sort)
    )
    return 1 - sum(lengths) / slots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scoring.json"))
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"{DATA} not found", file=sys.stderr)
        return 2
    prompts, completions = workload(DATA, args.posts)
    reward = EmbeddedSummaryReward(batch_size=args.batch_size, cache_size=0)
    reward.score(prompts[:8], completions[:8])  # warm-up (allocator, kernels)

    def run_mode(mode: str) -> list[float | None]:
        if mode == "plain":
            return plain_scores(reward, prompts, completions)
        reward.sort_by_length = mode == "bucketed"
        return reward.score(prompts, completions)

    modes = ("plain", "unsorted", "bucketed")
    times: dict[str, list[float]] = {m: [] for m in modes}
    scores: dict[str, list[float | None]] = {}
    for _ in range(args.repeats):
        for mode in modes:
            start = time.perf_counter()
            scores[mode] = run_mode(mode)
            times[mode].append(time.perf_counter() - start)
            print(f"{mode:9s} {times[mode][-1]:7.2f} s", flush=True)

    n = len(completions)
    rate = {m: n / min(times[m]) for m in modes}
    diff = max(abs(a - b) for a, b in zip(scores["plain"], scores["bucketed"], strict=True))  # type: ignore[operator]
    summaries = [c.strip() for c in completions]
    posts = list(dict.fromkeys(post_body(p) for p in prompts))
    result = {
        "command": "python benchmarks/bench_scoring.py " + " ".join(sys.argv[1:]),
        "reward": "embedded:minilm-l6 (EmbeddedSummaryReward)",
        "device": str(reward.device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "posts": args.posts,
        "generations": n,
        "batch_size": args.batch_size,
        "seconds": times,
        "generations_per_s": {m: round(r, 2) for m, r in rate.items()},
        "speedup_bucketed_vs_unsorted": round(rate["bucketed"] / rate["unsorted"], 2),
        "speedup_bucketed_vs_plain": round(rate["bucketed"] / rate["plain"], 2),
        "padding_share": {
            "summaries_unsorted": round(padding_share(reward, summaries, 128, False), 3),
            "summaries_bucketed": round(padding_share(reward, summaries, 128, True), 3),
            "posts_unsorted": round(padding_share(reward, posts, 256, False), 3),
            "posts_bucketed": round(padding_share(reward, posts, 256, True), 3),
        },
        "max_abs_score_diff_plain_vs_bucketed": diff,
    }
    with atomic_write(args.out) as handle:
        json.dump(result, handle, indent=2)
        handle.write("\n")
    print(json.dumps({k: result[k] for k in list(result)[-5:]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
