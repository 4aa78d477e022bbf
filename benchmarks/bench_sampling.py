"""Generations per second: HFSampler against `generate(num_return_sequences=K)`.

A speed measurement, not a test. Three methods, with the same weights:

- sampler: `samplers.HFSampler` as shipped (prefill once per prompt, own decode loop, shared-prefix
  attention or a repeated StaticCache, top-p on a topk shortlist);
- previous: the sampler as it was before its own decode loop (prefill once per prompt, the
  DynamicCache repeated K times, then `generate` decodes), kept here only as a reference;
- generate: transformers' `model.generate(num_return_sequences=K)`, prefilling every prompt K times.

All get the same TL;DR prompts (cut to at most `max_prompt_tokens` by the sampler's own
`encode_prompts`), the same batches (sorted by length, `prompt_batch_size` prompts per call, left
padding, pad = eos), the same sampling settings (T 0.9, top_p 0.9, top_k 0), the same suppressed
control tokens and stop ids, and all are forced to generate exactly `max_new_tokens` tokens
(`min_new_tokens` = `max_new_tokens`), so early stopping plays no part. The order of methods
alternates between repeats and the median per-repeat ratio is reported, since the machine is shared
and noisy. Before timing, greedy sampler output is checked token for token against `generate`.

A forward hook on the model splits each run's wall time into prefill forwards (more than one new
token), decode forwards (one new token) and the rest (per-step logits processing and sampling,
stopping criteria, cache set-up, tokenizing and decoding text).

    .venv/bin/python benchmarks/bench_sampling.py --num-prompts 4 --k 4 16 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from alignment.conditioning import control_token_ids
from alignment.config import SamplingConfig
from alignment.models import load_model, load_tokenizer
from alignment.prompts import load_prompts
from samplers import HFSampler

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str(ROOT.parent / "shared" / "data" / "tldr_dev.jsonl")  # ../shared beside the clone
DEFAULT_MODEL = "embedded:smollm2-135m-instruct"


@dataclass
class ForwardTimer:
    """Wall time of the model's forward calls, split by how many new tokens each one fed."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_calls: int = 0
    decode_calls: int = 0
    _start: float = field(default=0.0, repr=False)

    def reset(self) -> None:
        self.prefill_s = self.decode_s = 0.0
        self.prefill_calls = self.decode_calls = 0

    def attach(self, model: torch.nn.Module) -> None:
        def pre(_module, _args, _kwargs):
            self._start = time.perf_counter()

        def post(_module, args, kwargs, _output):
            elapsed = time.perf_counter() - self._start
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and ids.shape[-1] > 1:
                self.prefill_s += elapsed
                self.prefill_calls += 1
            else:
                self.decode_s += elapsed
                self.decode_calls += 1

        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post, with_kwargs=True)


def length_batches(encoded: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Prompt indices sorted by length, in chunks of `size`: the batches HFSampler makes."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def run_sampler(sampler: HFSampler, prompts: list[str], k: int, seed: int) -> tuple[int, int]:
    """(generations, new tokens) from one HFSampler.sample call."""
    out = sampler.sample(prompts, k, seed=seed)
    gens = [g for per_prompt in out for g in per_prompt]
    return len(gens), sum(g.num_tokens for g in gens)


def _batch_tensors(
    encoded: Sequence[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded ids and attention mask for one batch, and its width."""
    width = max(len(x) for x in encoded)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded], device=device)
    return input_ids, mask, width


def run_previous(
    sampler: HFSampler, prompts: list[str], k: int, seed: int, min_new_tokens: int
) -> tuple[int, int]:
    """(generations, new tokens) the way HFSampler sampled before its own decode loop.

    Each prompt prefilled once, its DynamicCache repeated k times, then `generate` decodes.
    """
    model, tok, cfg = sampler.model, sampler.tokenizer, sampler.config
    encoded = sampler.encode_prompts(prompts)
    pad = tok.pad_token_id
    torch.manual_seed(seed)
    generations = new_tokens = 0
    with torch.no_grad():
        for batch in length_batches(encoded, cfg.prompt_batch_size):
            input_ids, mask, width = _batch_tensors([encoded[i] for i in batch], pad, model.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            prefill = model(
                input_ids=input_ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                use_cache=True,
                logits_to_keep=1,
            )
            cache = prefill.cache
            cache.batch_repeat_interleave(k)
            out = model.generate(
                input_ids=input_ids.repeat_interleave(k, dim=0),
                attention_mask=mask.repeat_interleave(k, dim=0),
                cache=cache,
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=0,
                max_new_tokens=cfg.max_new_tokens,
                min_new_tokens=min_new_tokens,
                eos_token_id=sampler.stop_ids,
                pad_token_id=pad,
                suppress_tokens=control_token_ids(tok) or None,
            )
            gens = [sampler._decode(row) for row in out[:, width:].tolist()]
            generations += len(gens)
            new_tokens += sum(g.num_tokens for g in gens)
    return generations, new_tokens


def greedy_check(sampler: HFSampler, prompts: list[str], max_new_tokens: int) -> bool:
    """Whether the sampler's greedy tokens equal plain greedy `generate`'s, prompt by prompt."""
    model, tok = sampler.model, sampler.tokenizer
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, prompt_batch_size=len(prompts))
    greedy = HFSampler(model, tok, cfg)
    encoded = greedy.encode_prompts(prompts)
    ours = [gens[0] for gens in greedy.sample(prompts, 1, seed=0, greedy=True)]
    same = True
    with torch.no_grad():
        for gen, ids in zip(ours, encoded, strict=True):
            out = model.generate(
                input_ids=torch.tensor([ids], device=model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                eos_token_id=greedy.stop_ids,
                pad_token_id=tok.pad_token_id,
                suppress_tokens=control_token_ids(tok) or None,
            )
            same &= greedy._decode(out[0, len(ids) :].tolist()) == gen
    return same


def run_generate(
    sampler: HFSampler, prompts: list[str], k: int, seed: int, min_new_tokens: int
) -> tuple[int, int]:
    """(generations, new tokens) from transformers' generate(num_return_sequences=k)."""
    model, tok, cfg = sampler.model, sampler.tokenizer, sampler.config
    encoded = sampler.encode_prompts(prompts)
    pad = tok.pad_token_id
    stops = set(sampler.stop_ids)
    torch.manual_seed(seed)
    generations = new_tokens = 0
    with torch.no_grad():
        for batch in length_batches(encoded, cfg.prompt_batch_size):
            input_ids, mask, width = _batch_tensors([encoded[i] for i in batch], pad, model.device)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=0,
                num_return_sequences=k,
                max_new_tokens=cfg.max_new_tokens,
                min_new_tokens=min_new_tokens,
                eos_token_id=sampler.stop_ids,
                pad_token_id=pad,
                suppress_tokens=control_token_ids(tok) or None,
            )
            rows = out[:, width:].tolist()
            tok.batch_decode(rows, skip_special_tokens=True)  # the sampler decodes text too
            for row in rows:
                end = next((i for i, t in enumerate(row) if t in stops), len(row))
                new_tokens += end
            generations += len(rows)
    return generations, new_tokens


def measure(
    name: str, fn: Callable[[], tuple[int, int]], timer: ForwardTimer, k: int, repeat: int
) -> dict[str, object]:
    timer.reset()
    start = time.perf_counter()
    generations, new_tokens = fn()
    wall = time.perf_counter() - start
    forward = timer.prefill_s + timer.decode_s
    run = {
        "method": name,
        "k": k,
        "repeat": repeat,
        "wall_s": round(wall, 3),
        "generations": generations,
        "new_tokens": new_tokens,
        "generations_per_s": round(generations / wall, 4),
        "tokens_per_s": round(new_tokens / wall, 3),
        "prefill_forward_s": round(timer.prefill_s, 3),
        "prefill_calls": timer.prefill_calls,
        "decode_forward_s": round(timer.decode_s, 3),
        "decode_calls": timer.decode_calls,
        "other_s": round(wall - forward, 3),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    print(
        f"  k={k:<3} repeat={repeat} {name:<9} {wall:7.1f} s  "
        f"{run['generations_per_s']:7.3f} gen/s  prefill {timer.prefill_s:6.1f} s  "
        f"decode {timer.decode_s:6.1f} s  other {wall - forward:5.1f} s",
        flush=True,
    )
    return run


METHODS = ("sampler", "previous", "generate")


def summarize(runs: list[dict], ks: Sequence[int], expected_tokens: int) -> list[dict]:
    rows = []
    for k in ks:
        by = {m: [r for r in runs if r["k"] == k and r["method"] == m] for m in METHODS}
        row: dict[str, object] = {"k": k}
        for base in ("generate", "previous"):
            ratios = [
                s["generations_per_s"] / b["generations_per_s"]
                for s, b in zip(by["sampler"], by[base], strict=True)
            ]
            row[f"speedup_vs_{base}_median"] = round(statistics.median(ratios), 3)
            row[f"speedup_vs_{base}_per_repeat"] = [round(x, 3) for x in ratios]
        for m, rs in by.items():
            row[m] = {
                key: round(statistics.median(r[key] for r in rs), 3)
                for key in (
                    "wall_s",
                    "generations_per_s",
                    "tokens_per_s",
                    "prefill_forward_s",
                    "decode_forward_s",
                    "other_s",
                )
            }
            row[m]["generations"] = rs[0]["generations"]
            row[m]["new_tokens"] = rs[0]["new_tokens"]
            row[m]["every_generation_full_length"] = all(
                r["new_tokens"] == r["generations"] * expected_tokens for r in rs
            )
        rows.append(row)
    return rows


def print_table(summary: list[dict]) -> None:
    head = (
        f"{'K':>3}  {'method':<9} {'gens':>5} {'tokens':>6} {'wall s':>7} {'gen/s':>7} "
        f"{'tok/s':>7} {'prefill s':>9} {'decode s':>8} {'other s':>7}  sampler speedup"
    )
    print(head)
    print("-" * len(head))
    for row in summary:
        for m in METHODS:
            r = row[m]
            speed = f"{row[f'speedup_vs_{m}_median']:.2f}x" if m != "sampler" else ""
            print(
                f"{row['k']:>3}  {m:<9} {r['generations']:>5} {r['new_tokens']:>6} "
                f"{r['wall_s']:>7.1f} {r['generations_per_s']:>7.3f} {r['tokens_per_s']:>7.2f} "
                f"{r['prefill_forward_s']:>9.1f} {r['decode_forward_s']:>8.1f} "
                f"{r['other_s']:>7.1f}  {speed}"
            )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", default=DEFAULT_DATA, help="TL;DR JSONL; the first N rows are used")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--k", type=int, nargs="+", default=[4, 16])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--prompt-batch-size", type=int, default=SamplingConfig.prompt_batch_size)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine 2 threads thrash)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampling.json"))
    args = p.parse_args(argv)
    if args.repeats < 1 or args.num_prompts < 1:
        p.error("--repeats and --num-prompts must be >= 1")

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    prompts = [row.prompt for row in load_prompts(args.data, limit=args.num_prompts)]
    config = SamplingConfig(
        max_new_tokens=args.max_new_tokens, prompt_batch_size=args.prompt_batch_size
    )
    sampler = HFSampler(model, tokenizer, config)
    # HFSampler has no min_new_tokens option; it reads it from the model's generation config.
    model.generation_config.min_new_tokens = args.max_new_tokens
    lengths = [len(ids) for ids in sampler.encode_prompts(prompts)]
    timer = ForwardTimer()
    timer.attach(model)

    # Warm-up (first-call allocations, lazy imports), not measured.
    warm = HFSampler(model, tokenizer, SamplingConfig(max_new_tokens=2))
    model.generation_config.min_new_tokens = 2
    warm.sample(prompts[:1], 2, seed=args.seed)
    run_previous(warm, prompts[:1], 2, args.seed, min_new_tokens=2)
    run_generate(warm, prompts[:1], 2, args.seed, min_new_tokens=2)
    model.generation_config.min_new_tokens = 0
    greedy_same = greedy_check(sampler, prompts[:2], 16)
    print(f"greedy sampler tokens equal greedy generate's (2 prompts, 16 tokens): {greedy_same}")
    model.generation_config.min_new_tokens = args.max_new_tokens

    print(
        f"{len(prompts)} prompts, tokens {lengths}, K {args.k}, {args.max_new_tokens} new "
        f"tokens, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}",
        flush=True,
    )
    methods = {
        "sampler": lambda k: run_sampler(sampler, prompts, k, args.seed),
        "previous": lambda k: run_previous(sampler, prompts, k, args.seed, args.max_new_tokens),
        "generate": lambda k: run_generate(sampler, prompts, k, args.seed, args.max_new_tokens),
    }
    runs = []
    for k in args.k:
        for repeat in range(args.repeats):
            order = list(METHODS) if repeat % 2 == 0 else list(reversed(METHODS))
            for name in order:
                runs.append(measure(name, lambda n=name, k=k: methods[n](k), timer, k, repeat))

    summary = summarize(runs, args.k, args.max_new_tokens)
    print()
    print_table(summary)
    result = {
        "benchmark": "HFSampler vs its previous version vs generate(num_return_sequences=K)",
        "command": " ".join(
            [
                ".venv/bin/python",
                "benchmarks/bench_sampling.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "model": args.model,
        "data": args.data,
        "num_prompts": len(prompts),
        "prompt_tokens": lengths,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,
        "prompt_batch_size": args.prompt_batch_size,
        "sampling": {"temperature": config.temperature, "top_p": config.top_p, "top_k": 0},
        "seed": args.seed,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": str(model.device),
            "dtype": str(model.dtype),
            "note": "shared machine, other jobs may run; compare ratios, not absolute times",
        },
        "speedup_is": "sampler generations/s divided by the other method's, same repeat",
        "greedy_matches_generate": greedy_same,
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
