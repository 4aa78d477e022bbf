"""`quark-alt eval`: held-out comparison of policies on the same prompts, seed and sampling.

The first POLICY is the baseline (typically the initial policy); every later one is compared with
it paired by prompt. Rewards are summarised with the prompt as the unit (`alignment.comparison`):
the K samples of a prompt are not independent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from alignment.best_of_n import summarize_best_of_n
from alignment.comparison import (
    paired_difference,
    per_prompt_means,
    prompt_level_summary,
    win_fractions,
)
from alignment.conditioning import Conditioning
from alignment.config import BestOfNConfig, EvalConfig, SamplingConfig, TrainConfig
from alignment.errors import UserError
from alignment.evaluation import (
    likelihood_metrics,
    sample_and_score,
    sample_conditioning_curve,
    sample_metrics,
)
from alignment.io import atomic_write
from alignment.loop import latest_checkpoint
from alignment.models import load_model_and_tokenizer, load_tokenizer
from alignment.prompts import PromptRow, load_prompts
from experiments.commands.common import (
    add_sampling_arguments,
    format_best_of_n,
    sampling_config,
)
from rewards import load_reward
from rewards.cli import reward_options
from rewards.judge import OUTCOME_VALUE, PairwiseJudge
from rewards.llm_client import ChatClient
from samplers import make_sampler

RUN_DIR_MARKERS = ("config.yaml", "state.json", "checkpoints")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "policies",
        nargs="+",
        metavar="POLICY",
        help="run directory (its newest checkpoint), checkpoint folder, hub id, path or "
        "embedded: name; the first is the baseline the others are compared with",
    )
    parser.add_argument("--prompts", required=True, help="held-out prompt set (JSONL)")
    parser.add_argument("--reward", default="embedded", help="reward spec, as `quark-alt score`")
    parser.add_argument(
        "--reward-arg", action="append", default=[], metavar="KEY=VALUE", help="reward option"
    )
    parser.add_argument(
        "-k", "--num-samples", type=int, default=EvalConfig.samples_per_prompt, help="per prompt"
    )
    parser.add_argument(
        "--reference",
        default=None,
        help="model for perplexity and KL (default: the first POLICY; 'none' to skip both)",
    )
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--out", default="eval.json", help="JSON report to write")
    parser.add_argument(
        "--conditioning-curve",
        action="store_true",
        help="also evaluate each conditioned policy on every control k = 0..K-1",
    )
    parser.add_argument(
        "--vs-references",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="win rate against the human summaries (default: when every prompt has one)",
    )
    parser.add_argument("--no-condition", action="store_true", help="evaluate all unconditioned")
    parser.add_argument(
        "--best-of-n",
        type=int,
        nargs="+",
        metavar="N",
        help="also the reward and KL of the best of N samples by the reward, for each N "
        "(from one pool of max(N) samples per prompt)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=TrainConfig.batch_size, help="likelihood forward batch"
    )
    judge = parser.add_argument_group(
        "LLM judge (optional): every sample against the human summary and against the first "
        "POLICY's sample of the same prompt, asked in both orders"
    )
    judge.add_argument("--judge-url", help="OpenAI-compatible endpoint, e.g. http://host/v1")
    judge.add_argument("--judge-model", help="the judge's model name at that endpoint")
    judge.add_argument(
        "--judge-key-env", default="OPENAI_API_KEY", help="environment variable with the key"
    )
    judge.add_argument("--judge-cache", help="reply cache folder (default: OUT.judge_cache)")
    add_sampling_arguments(parser)


def resolve_policy(name: str) -> str:
    """A run directory becomes its newest checkpoint; anything else passes through unchanged."""
    folder = Path(name)
    if not folder.is_dir() or not any((folder / m).exists() for m in RUN_DIR_MARKERS):
        return name
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
        return name  # a model folder that happens to hold a config.yaml
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise UserError(f"{name}: a run directory without checkpoints (no checkpoints/iter_*)")
    return str(checkpoint)


def _policy_conditioning(name: str, path: str, tokenizer: Any, off: bool) -> Conditioning | None:
    return None if off else Conditioning.load(path, tokenizer)


def _check_vocab(reference_tokenizer: Any, tokenizer: Any, policy: str, reference: str) -> None:
    ref_vocab, vocab = reference_tokenizer.get_vocab(), tokenizer.get_vocab()
    if any(vocab.get(tok) != idx for tok, idx in ref_vocab.items()):
        raise UserError(
            f"{policy} and the reference {reference} have different vocabularies: perplexity "
            "and KL need the same tokenizer (give --reference, or --reference none)"
        )


def _reward_block(rewards: list[float | None], k: int) -> tuple[list[float | None], dict]:
    means = per_prompt_means(rewards, k)
    summary = prompt_level_summary(means)
    return means, {"reward_mean": summary["mean"], "reward_stderr": summary["stderr"]}


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: write null instead (strict parsers refuse NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def _fmt(value: float | None, digits: int = 4) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    k = args.num_samples
    if k < 1:
        raise UserError(f"--num-samples must be >= 1, got {k}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.conditioning_curve and args.no_condition:
        raise UserError("--conditioning-curve needs conditioned policies; drop --no-condition")
    if args.best_of_n:
        try:
            BestOfNConfig(n=args.best_of_n)
        except ValueError as err:
            raise UserError(f"--best-of-n: {err}") from err
    if bool(args.judge_url) != bool(args.judge_model):
        raise UserError("--judge-url and --judge-model go together")
    cfg: SamplingConfig = sampling_config(args)
    rows = load_prompts(args.prompts, limit=args.limit)
    has_refs = all(r.reference for r in rows)
    if args.vs_references and not has_refs:
        missing = sum(not r.reference for r in rows)
        raise UserError(
            f"{args.prompts}: --vs-references needs a reference summary ('summary' or 'label') "
            f"in every row; {missing} of {len(rows)} rows have none"
        )
    vs_refs = has_refs if args.vs_references is None else args.vs_references
    paths = [resolve_policy(p) for p in args.policies]  # bad run dirs fail before any loading
    # Conditioning from the tokenizers alone, so every such mistake fails before any sampling.
    conditionings = [
        _policy_conditioning(name, path, load_tokenizer(path), args.no_condition)
        for name, path in zip(args.policies, paths, strict=True)
    ]
    if args.conditioning_curve and not any(conditionings):
        raise UserError(
            f"--conditioning-curve: {', '.join(args.policies)} "
            f"{'is' if len(paths) == 1 else 'are'} not conditioned (no conditioning.json and no "
            "control tokens in the tokenizer)"
        )
    reference_name = args.reference if args.reference is not None else paths[0]
    use_reference = reference_name.lower() != "none"

    reward = load_reward(args.reward, **reward_options(args.reward_arg))
    reference_rewards = (
        reward.score([r.prompt for r in rows], [r.reference or "" for r in rows])
        if vs_refs
        else None
    )
    reference_model = reference_tokenizer = None
    if use_reference:
        reference_model, reference_tokenizer = load_model_and_tokenizer(
            reference_name, dtype=args.dtype, device=args.device
        )
        reference_model.requires_grad_(False)

    settings = {
        "prompts": str(args.prompts),
        "num_prompts": len(rows),
        "limit": args.limit,
        "samples_per_prompt": k,
        "seed": args.seed,
        "reward": args.reward,
        "reward_options": reward_options(args.reward_arg),
        "reference": reference_name if use_reference else None,
        "vs_references": vs_refs,
        "no_condition": args.no_condition,
        "conditioning_curve": args.conditioning_curve,
        "best_of_n": args.best_of_n,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "sampling": asdict(cfg),
    }
    judge = (
        PairwiseJudge(
            ChatClient(
                args.judge_url,
                args.judge_model,
                api_key_env=args.judge_key_env,
                cache_dir=args.judge_cache or f"{args.out}.judge_cache",
            )
        )
        if args.judge_url
        else None
    )
    if judge is not None:
        settings["judge"] = {"url": args.judge_url, "model": args.judge_model}
    # Each finished policy stays here, so a killed eval resumes and a later eval that adds a
    # policy to the same comparison recomputes only the new one.
    done = Path(f"{args.out}.parts")
    results: list[dict] = []
    baseline_means: list[float | None] | None = None
    for name, path, conditioning in zip(args.policies, paths, conditionings, strict=True):
        part = done / _part_name(name, path, settings, rows)
        if part.is_file():
            result = json.loads(part.read_text())
            print(f"{name}: reusing its finished evaluation {part}", file=sys.stderr)
        else:
            result = _evaluate_policy(
                name, path, conditioning, rows, reward, cfg, args, reference_model,
                reference_tokenizer, reference_name, reference_rewards,
            )  # fmt: skip
            with atomic_write(part) as handle:
                json.dump(result, handle)
        means = result.pop("_per_prompt")
        completions = result.pop("_completions")
        if baseline_means is None:
            baseline_means, baseline_completions = means, completions
            result["paired_vs_baseline"] = None
        else:
            paired = paired_difference(baseline_means, means).to_dict()
            result["paired_vs_baseline"] = {"baseline": args.policies[0], **paired}
        if judge is not None:
            result["judge"] = _judge_policy(
                judge, rows, completions, baseline_completions if len(results) else None, k, vs_refs
            )
        results.append(result)
        print(_summary_line(result))
        if result["best_of_n"]:
            print(format_best_of_n(result["best_of_n"]))

    report = {"settings": settings, "policies": results}
    with atomic_write(args.out) as handle:
        json.dump(_nan_to_none(report), handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    print(f"wrote {args.out}")
    return 0


def _part_name(name: str, path: str, settings: dict, rows: list[PromptRow]) -> str:
    """A finished policy's file: its checkpoint, the settings and the prompts decide it, so a
    resumed eval reuses exactly the results it would recompute (a newer checkpoint does not)."""
    key = json.dumps([str(Path(path).resolve()), settings, [r.prompt for r in rows]], default=str)
    slug = "".join(c if c.isalnum() else "_" for c in name)[-40:]
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _evaluate_policy(
    name: str,
    path: str,
    conditioning: Conditioning | None,
    rows: list[PromptRow],
    reward: Any,
    cfg: SamplingConfig,
    args: argparse.Namespace,
    reference_model: Any,
    reference_tokenizer: Any,
    reference_name: str,
    reference_rewards: list[float | None] | None,
) -> dict:
    k = args.num_samples
    model, tokenizer = load_model_and_tokenizer(path, dtype=args.dtype, device=args.device)
    sampler = make_sampler(model, tokenizer, cfg)
    scored = sample_and_score(sampler, rows, reward.score, conditioning, k, seed=args.seed)
    means, reward_summary = _reward_block(scored.rewards, k)
    metrics: dict[str, Any] = {
        **sample_metrics(scored),
        **reward_summary,  # prompt-level mean +- SE replaces the per-sample one
        "num_prompts": len(rows),
        "num_samples": len(scored.generations),
        "reward_prompts": prompt_level_summary(means)["n"],
        "per_prompt_reward": means,
    }
    if reference_model is not None:
        _check_vocab(reference_tokenizer, tokenizer, name, reference_name)
        metrics.update(
            likelihood_metrics(model, reference_model, tokenizer, cfg, args.batch_size, scored)
        )
    if reference_rewards is not None:
        wins = win_fractions(scored.rewards, reference_rewards, k)
        metrics["win_rate_vs_references"] = prompt_level_summary(wins)
    curve = None
    if args.conditioning_curve and conditioning is not None:
        curve = sample_conditioning_curve(
            sampler, rows, reward.score, conditioning, k, seed=args.seed, best=scored
        )
    best_of_n = None
    if args.best_of_n:
        pool = max(args.best_of_n)
        drawn = (  # the -k samples above are that pool when k is its size
            scored
            if pool == k
            else sample_and_score(sampler, rows, reward.score, conditioning, pool, seed=args.seed)
        )
        best_of_n = summarize_best_of_n(drawn.rewards, drawn.completions, pool, args.best_of_n)
    return {
        "name": name,
        "path": path,
        "conditioning": None
        if conditioning is None
        else {**asdict(conditioning), "controls": list(conditioning.controls)},
        "control": conditioning.best if conditioning else None,
        "metrics": metrics,
        "conditioning_curve": curve,
        "best_of_n": best_of_n,
        "_per_prompt": means,
        "_completions": scored.completions,
    }


def _judge_policy(
    judge: PairwiseJudge,
    rows: list[PromptRow],
    completions: list[str],
    baseline: list[str] | None,
    k: int,
    vs_refs: bool,
) -> dict:
    """The judge's win rates of one policy's samples (prompt-major, `k` each): against the human
    summaries and against the baseline's sample of the same prompt and index (ties count 1/2;
    a pair with an unusable reply is left out)."""
    prompts = [r.prompt for r in rows for _ in range(k)]
    out: dict[str, Any] = {}
    opponents = (
        {"vs_references": [r.reference or "" for r in rows for _ in range(k)]} if vs_refs else {}
    )
    if baseline is not None:
        opponents["vs_baseline"] = baseline
    for key, other in opponents.items():
        outcomes = judge.compare(prompts, completions, other)
        values = [None if o is None else OUTCOME_VALUE[o] for o in outcomes]
        out[key] = {
            **prompt_level_summary(per_prompt_means(values, k)),
            "wins": outcomes.count("win"),
            "ties": outcomes.count("tie"),
            "losses": outcomes.count("loss"),
            "unusable": outcomes.count(None),
        }
    return out


def _summary_line(result: dict) -> str:
    m = result["metrics"]
    parts = [
        f"{result['name']}: reward {_fmt(m['reward_mean'])} +- {_fmt(m['reward_stderr'])} "
        f"({m['num_prompts']} prompts, {m['num_samples']} samples)",
        f"len {_fmt(m['length'], 1)}",
        f"stop {_fmt(m['stopped_fraction'], 2)}",
        f"empty {_fmt(m['empty_fraction'], 2)}",
        f"dist-1/2 {_fmt(m['distinct_1'], 3)}/{_fmt(m['distinct_2'], 3)}",
    ]
    if "ref_perplexity" in m:
        parts.append(f"ppl {_fmt(m['ref_perplexity'], 2)} kl {_fmt(m['kl'], 3)}")
    if "win_rate_vs_references" in m:
        w = m["win_rate_vs_references"]
        parts.append(f"win vs refs {_fmt(w['mean'], 3)} +- {_fmt(w['stderr'], 3)}")
    paired = result["paired_vs_baseline"]
    if paired:
        parts.append(
            f"vs baseline {paired['mean']:+.4f} +- {_fmt(paired['stderr'])} "
            f"(W/T/L {paired['wins']}/{paired['ties']}/{paired['losses']})"
        )
    for key, judged in (result.get("judge") or {}).items():
        parts.append(f"judge {key.replace('_', ' ')} {_fmt(judged['mean'], 3)}")
    curve = result["conditioning_curve"]
    if curve:
        d = curve["best_minus_worst"]
        parts.append(f"best-worst control {d['mean']:+.4f} +- {_fmt(d['stderr'])}")
    if result["conditioning"] is None:
        parts.append("unconditioned")
    return ", ".join(parts)
