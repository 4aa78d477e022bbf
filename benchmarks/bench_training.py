"""Training items per second: prompt-shared forward+backward against the plain batch.

A speed measurement, not a test. Both ways train the same weights on the same batches of the same
items and compute the same loss (`losses.quark_loss`, alpha 0.06, no KL):

- **plain**: `trainer.collate` + `trainer.target_logits` (every item's prompt run in full);
- **shared**: `prefix_sharing.shared_prefix_target_logits` (each shared prompt prefix run once,
  its KV cache repeated across the items, only the rest of each prompt plus its target run on
  top).

Items: the first N TL;DR posts as `prompts.tldr_prompt` builds them, cut by
`trainer.encode_prompt` (middle cut, tail kept), 5 control tokens added by
`conditioning.add_control_tokens`, 2 targets per quantile (the human summary and the post's
opening words, as `trainer.encode_target` encodes them with EOS), so 10 items per post; one
batch = the 10 items of one post. With suffix placement all 10 share the raw prompt; with prefix
placement only the 2 items of one quantile share their (whole) conditioned prompt.

Steps are interleaved per post (shared suffix, shared prefix, plain, rotating the order) so the
load of the shared machine hits all ways alike; each way's figure is items/s over all posts and
the speedup is its ratio to the plain way's. The plain step is timed once per post because its
cost does not depend on the placement (see `run`). Each plain step is also compared with the
shared step of the same items: the largest loss and gradient differences are recorded.

    .venv/bin/python benchmarks/bench_training.py --num-prompts 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from alignment.conditioning import add_control_tokens, condition_prompt, quantile_token
from alignment.config import SamplingConfig
from alignment.io import read_jsonl
from alignment.losses import quark_loss
from alignment.models import load_model_and_tokenizer
from alignment.prefix_sharing import build_shared_batch, shared_target_logits
from alignment.prompts import tldr_prompt
from alignment.trainer import (
    collate,
    encode_prompt,
    encode_target,
    freeze_bottom_layers,
    target_logits,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str(ROOT.parent / "shared" / "data" / "tldr_dev.jsonl")  # ../shared beside the clone
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
NUM_QUANTILES = 5

Item = tuple[list[int], list[int]]


def build_items(
    tokenizer, rows: list[dict], placement: str, sampling: SamplingConfig, max_target: int
) -> list[list[Item]]:
    """One list of 10 (prompt ids, target ids) items per post; placement "bare" = no control."""
    per_post = []
    for row in rows:
        prompt = tldr_prompt(row["subreddit"], row["title"], row["post"])
        opening = " ".join(row["post"].split()[:30])
        targets = [
            encode_target(tokenizer, text, True, max_target) for text in (row["summary"], opening)
        ]
        items = []
        for k in range(NUM_QUANTILES):
            if placement == "bare":  # what the KL reference sees: no control token
                ids = encode_prompt(tokenizer, prompt, sampling)
            else:
                conditioned = condition_prompt(prompt, quantile_token(k), placement)  # type: ignore[arg-type]
                ids = encode_prompt(tokenizer, conditioned, sampling)
            items.extend((ids, target) for target in targets)
        per_post.append(items)
    return per_post


def step(
    model: torch.nn.Module, items: list[Item], pad: int, shared: bool
) -> tuple[float, float, dict[str, torch.Tensor]]:
    """One forward + loss + backward; returns seconds, loss and the gradients (cloned)."""
    prompts, targets = [p for p, _ in items], [t for _, t in items]
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    if shared:
        batch = build_shared_batch(prompts, targets, pad)
        logits = shared_target_logits(model, batch)
    else:
        batch = collate(prompts, targets, pad)
        logits = target_logits(model, batch)
    loss, _ = quark_loss(logits, batch.labels, batch.label_mask, entropy_coef=0.06)
    loss.backward()
    seconds = time.perf_counter() - start
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return seconds, loss.item(), grads


def run(
    model: torch.nn.Module,
    posts: dict[str, list[list[Item]]],
    pad: int,
    log: Callable[[str], None],
) -> dict:
    """Per post: one shared step per placement and one plain step, in rotating order.

    The plain step's cost does not depend on the placement (the same token counts: one control
    token per prompt, the same middle cut), so it is timed once per post, on the suffix items for
    even posts and the prefix items for odd ones, and it checks the shared step of that placement
    (largest loss and gradient differences).
    """
    placements = list(posts)
    num_posts = len(posts[placements[0]])
    seconds: dict[str, list[float]] = {way: [] for way in [*placements, "plain"]}
    plain_of: list[str] = []
    diffs = {
        p: {"max_loss_diff": 0.0, "max_grad_diff": 0.0, "max_abs_grad": 0.0} for p in placements
    }
    # Untimed warm-up of every way on the first post: first calls pay one-off allocation costs.
    for placement in placements:
        step(model, posts[placement][0], pad, shared=True)
    step(model, posts[placements[0]][0], pad, shared=False)
    for b in range(num_posts):
        plain_placement = placements[b % len(placements)]
        ways = [*placements, "plain"]
        ways = ways[b % len(ways) :] + ways[: b % len(ways)]
        results = {}
        for way in ways:
            placement = plain_placement if way == "plain" else way
            results[way] = step(model, posts[placement][b], pad, shared=way != "plain")
            seconds[way].append(results[way][0])
        check, plain = results[plain_placement], results["plain"]
        d = diffs[plain_placement]
        d["max_loss_diff"] = max(d["max_loss_diff"], abs(check[1] - plain[1]))
        for name, g in plain[2].items():
            d["max_grad_diff"] = max(d["max_grad_diff"], float((check[2][name] - g).abs().max()))
            d["max_abs_grad"] = max(d["max_abs_grad"], float(g.abs().max()))
        plain_of.append(plain_placement)
        log(f"  post {b}: " + " ".join(f"{w} {results[w][0]:.2f}s" for w in ways))
    items = sum(len(x) for x in posts[placements[0]])
    plain_rate = items / sum(seconds["plain"])
    out: dict = {
        "plain": {
            "items": items,
            "seconds": round(sum(seconds["plain"]), 2),
            "items_per_s": round(plain_rate, 3),
            "per_post_s": [round(x, 2) for x in seconds["plain"]],
            "per_post_items_of": plain_of,
        }
    }
    for placement in placements:
        rate = items / sum(seconds[placement])
        out[placement] = {
            "items": items,
            "seconds": round(sum(seconds[placement]), 2),
            "items_per_s": round(rate, 3),
            "speedup_vs_plain": round(rate / plain_rate, 2),
            "per_post_s": [round(x, 2) for x in seconds[placement]],
            **diffs[placement],
        }
    return out


@torch.no_grad()
def run_reference(
    model: torch.nn.Module, posts: list[list[Item]], pad: int, log: Callable[[str], None]
) -> dict:
    """The KL term's no-grad reference forward on bare prompts, shared vs plain, alternating.

    All 10 items of a post share the bare prompt whatever the placement, so one prefix per batch.
    """
    seconds: dict[str, list[float]] = {"shared": [], "plain": []}
    max_diff = 0.0
    for b, items in enumerate([posts[0], *posts]):  # the first pass is an untimed warm-up
        prompts, targets = [p for p, _ in items], [t for _, t in items]
        logits = {}
        for way in ("shared", "plain") if b % 2 else ("plain", "shared"):
            start = time.perf_counter()
            if way == "shared":
                logits[way] = shared_target_logits(model, build_shared_batch(prompts, targets, pad))
            else:
                logits[way] = target_logits(model, collate(prompts, targets, pad))
            if b > 0:
                seconds[way].append(time.perf_counter() - start)
        mask = collate(prompts, targets, pad).label_mask.bool()
        max_diff = max(max_diff, float((logits["shared"] - logits["plain"])[mask].abs().max()))
        if b > 0:
            log(
                f"  reference post {b - 1}: shared {seconds['shared'][-1]:.2f}s "
                f"plain {seconds['plain'][-1]:.2f}s"
            )
    items = sum(len(x) for x in posts)
    rates = {way: items / sum(seconds[way]) for way in seconds}
    return {
        "items": items,
        "shared_seconds": round(sum(seconds["shared"]), 2),
        "plain_seconds": round(sum(seconds["plain"]), 2),
        "shared_items_per_s": round(rates["shared"], 3),
        "plain_items_per_s": round(rates["plain"], 3),
        "speedup": round(rates["shared"] / rates["plain"], 2),
        "per_post_shared_s": [round(x, 2) for x in seconds["shared"]],
        "per_post_plain_s": [round(x, 2) for x in seconds["plain"]],
        "max_logit_diff": max_diff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-prompt-tokens", type=int, default=400)
    parser.add_argument("--max-target-tokens", type=int, default=47, help="plus EOS")
    parser.add_argument("--unfrozen-ratio", type=float, default=0.3)
    parser.add_argument(
        "--placements", nargs="*", default=["suffix", "prefix"], help="none: skip training steps"
    )
    parser.add_argument(
        "--reference", action="store_true", help="also time the no-grad KL reference forward"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def log(msg: str) -> None:
        print(msg, flush=True)

    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    add_control_tokens(tokenizer, model, NUM_QUANTILES)
    frozen, blocks = freeze_bottom_layers(model, args.unfrozen_ratio)
    model.train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = SamplingConfig(max_prompt_tokens=args.max_prompt_tokens)
    rows = [obj for _, obj in read_jsonl(args.data)][: args.num_prompts]
    log(f"{args.model}: {blocks - frozen} of {blocks} blocks trainable; {len(rows)} posts")

    posts = {
        placement: build_items(tokenizer, rows, placement, sampling, args.max_target_tokens)
        for placement in [*args.placements, "bare"]
    }
    first = posts[args.placements[0] if args.placements else "bare"]
    results: dict = {}
    if args.placements:
        results = run(model, {p: posts[p] for p in args.placements}, pad, log)
    if args.reference:
        # Same weights as the policy: only the cost is measured, and it does not depend on them.
        results["reference_forward"] = run_reference(model, posts["bare"], pad, log)
    log(
        json.dumps(
            {k: {n: v for n, v in r.items() if "per_post" not in n} for k, r in results.items()}
        )
    )

    report = {
        "benchmark": "prompt-shared training forward+backward vs collate+target_logits",
        "command": "python benchmarks/bench_training.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "dtype": "float32",
        "data": args.data,
        "num_prompts": len(rows),
        "items_per_prompt": 2 * NUM_QUANTILES,
        "batch": "the 10 items of one post",
        "trainable_blocks": f"{blocks - frozen} of {blocks} (plus embeddings, final norm, head)",
        "loss": "quark_loss, entropy_coef 0.06, no KL",
        "reference_forward": "no-grad target_logits on bare prompts" if args.reference else None,
        "conditioned_prompt_tokens": [len(items[0][0]) for items in first],
        "target_tokens_with_eos": [[len(t) for _, t in items[:2]] for items in first],
        "results": results,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "processor": platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_average": os.getloadavg(),
            "note": "shared machine, other jobs may run; compare ratios, not absolute times",
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
