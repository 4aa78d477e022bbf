"""One Quark iteration on the ALT reference's configuration, stage by stage, against baselines.

A speed measurement, not a test. The configuration (`ALT_OVERRIDES`, through `load_config`, so
every other value is `alignment/config.py`'s default): SmolLM2-135M float32 on CPU, the first N
TL;DR posts whose prompt has at most 400 tokens, K = 8 samples per prompt, 48 new tokens, T 0.9,
top_p 0.9, EOS-only stop; the embedded MiniLM reward; 5 per-prompt quantiles x 2 samples drawn
per quantile (10 training items per post), batch 8, lr 2e-5, one epoch, the top 0.3 of the
blocks trainable, no KL. The first iteration as `alignment/loop.py` runs it: the policy gets the
control tokens, samples unconditioned, and the Quark algorithm builds its pool and trains.

Stages and their baselines, each in a subprocess of its own (so one stage's peak RSS, taken
with `resource.getrusage` at its end, never mixes with another's; model loading is timed apart
and not counted in the stage):

- sampling: `HFSampler` (the loop's sampler) against plain `model.generate` with the same
  settings and batches, `num_return_sequences=K` (`bench_sampling.run_generate`); both stop at
  EOS, so they may write different numbers of tokens (reported);
- scoring: the embedded reward on the sampler's generations, one call per prompt as the loop does;
- training: `Quark.update` (pool, balanced draw, `ConditionalTrainer`) on those scores, with
  `train.batches_by_prompt` true and false and both placements (`conditioning.placement`), and
  an unshared baseline: the same trainer with `trainer.shared_prefix_target_logits` replaced by
  `collate` + `target_logits` (every item's prompt run in full, as `bench_training.py`'s plain way).

An iteration's time is sampling + scoring + training; its peak RSS is the largest of its stages'
(the loop holds the policy, a reference copy and the reward in one process, so its peak is
higher by about their weights).

    .venv/bin/python benchmarks/bench_iteration.py             # the full configuration
    .venv/bin/python benchmarks/bench_iteration.py --num-prompts 1 --set sampling.max_new_tokens=8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import torch
import transformers
from accelerate import Accelerator
from bench_sampling import DEFAULT_DATA, ROOT, run_generate
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment import trainer
from alignment.algorithms import ALGORITHMS
from alignment.algorithms.base import Models
from alignment.config import Config, load_config
from alignment.models import load_model_and_tokenizer
from alignment.prompts import PromptRow, load_prompts
from alignment.records import SampleRecord, load_samples, save_samples
from rewards import load_reward
from samplers import HFSampler

ALT_OVERRIDES = [
    "model.policy=embedded:smollm2-135m-instruct",
    "model.dtype=float32",
    "model.device=cpu",
    "data.samples_per_prompt=8",
    "sampling.max_new_tokens=48",
    "sampling.temperature=0.9",
    "sampling.top_p=0.9",
    "sampling.stop_at_newline=false",
    "reward.name=embedded:minilm-l6",
    "pool.num_quantiles=5",
    "pool.num_samples_per_quantile=2",
    "train.batch_size=8",
    "train.learning_rate=2e-5",
    "train.num_epochs=1",
    "train.unfrozen_layers_ratio=0.3",
    "train.kl_coef=0",
]
"""The ALT reference's settings that differ from (or are pinned against) config.py's defaults."""

TRAIN_VARIANTS = [
    "prefix/by-prompt/shared",
    "prefix/shuffled/unshared",
    "suffix/by-prompt/shared",
    "prefix/shuffled/shared",
    "suffix/shuffled/shared",
]
"""placement / batching (`train.batches_by_prompt` true or ALT's uniform shuffle) / whether the
trainer shares prompt prefixes, in the order they run. The unshared one is the baseline: ALT's
layout and batching, every item's prompt run in full."""

BASELINE_TRAIN = "prefix/shuffled/unshared"
ALT_REFERENCE = {"iteration_s": 343, "sampling_s": 138, "training_s": 205, "peak_rss_gb": 8.2}
PREVIOUS = {"iteration_s": 230, "sampling_s": 70, "training_s": 160, "peak_rss_gb": 7.3}
GOAL_S = 170


def peak_rss_mb() -> float:
    """This process's RSS high-water mark so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def select_prompts(
    path: str, tokenizer: PreTrainedTokenizerBase, num: int, max_tokens: int
) -> list[PromptRow]:
    """The first `num` prompts of `path` of at most `max_tokens` tokens (as the sampler encodes)."""
    chosen = []
    for row in load_prompts(path):
        if len(tokenizer(row.prompt, add_special_tokens=True)["input_ids"]) <= max_tokens:
            chosen.append(row)
            if len(chosen) == num:
                return chosen
    raise SystemExit(f"{path}: only {len(chosen)} prompts of at most {max_tokens} tokens")


def plain_target_logits(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    min_fraction: float = 0.5,
) -> tuple[torch.Tensor, trainer.Batch]:
    """The trainer's forward without prompt sharing: `collate` + `target_logits`; the signature
    of `prefix_sharing.shared_prefix_target_logits`, which it stands in for."""
    batch = trainer.collate(prompts, targets, pad_id)
    return trainer.target_logits(model, batch), batch


def load_policy(config: Config) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, float]:
    """The policy as the loop's first iteration has it: control tokens added, eval mode."""
    start = time.perf_counter()
    policy, tokenizer = load_model_and_tokenizer(
        config.model.policy, dtype=config.model.dtype, device=config.model.device
    )
    conditioning = ALGORITHMS[config.algorithm].conditioning_for(config)
    if conditioning is not None:
        conditioning.prepare(tokenizer, policy, seed=config.seed)
    policy.eval()
    return policy, tokenizer, time.perf_counter() - start


def stage_sample(config: Config, args: argparse.Namespace, work: Path, method: str) -> dict:
    policy, tokenizer, load_s = load_policy(config)
    rows = select_prompts(args.data, tokenizer, args.num_prompts, args.max_prompt_tokens)
    sampler = HFSampler(policy, tokenizer, config.sampling)
    texts, k, seed = [r.prompt for r in rows], config.data.samples_per_prompt, config.seed + 1
    rss_loaded = peak_rss_mb()
    start = time.perf_counter()
    if method == "sampler":
        gens = sampler.sample(texts, k, seed=seed)
        seconds = time.perf_counter() - start
        flat = [g for per_prompt in gens for g in per_prompt]
        generations, new_tokens = len(flat), sum(g.num_tokens for g in flat)
        stopped = sum(g.finish_reason == "stop" for g in flat)
        save_samples(
            work / "samples.jsonl",
            [
                SampleRecord(
                    prompt=r.prompt,
                    id=r.id,
                    iteration=1,
                    generations=[g.text for g in gs],
                    finish_reasons=[g.finish_reason for g in gs],
                )
                for r, gs in zip(rows, gens, strict=True)
            ],
        )
    else:
        generations, new_tokens = run_generate(sampler, texts, k, seed, min_new_tokens=0)
        seconds = time.perf_counter() - start
        stopped = None
    lengths = [len(ids) for ids in sampler.encode_prompts(texts)]
    return {
        "seconds": seconds,
        "load_s": load_s,
        "generations": generations,
        "new_tokens": new_tokens,
        "stopped_at_eos": stopped,
        "prompt_ids": [r.id for r in rows],
        "prompt_tokens": lengths,
        "rss_after_load_mb": rss_loaded,
    }


def stage_score(config: Config, work: Path) -> dict:
    start = time.perf_counter()
    reward = load_reward(
        config.reward.name,
        batch_size=config.reward.batch_size,
        device=config.model.device,
        **config.reward.options,
    )
    records = load_samples(work / "samples.jsonl")
    load_s, rss_loaded = time.perf_counter() - start, peak_rss_mb()
    start = time.perf_counter()
    for record in records:  # one call per prompt, as the loop scores
        record.rewards = reward.score([record.prompt] * len(record.generations), record.generations)
    seconds = time.perf_counter() - start
    save_samples(work / "scored.jsonl", records)
    rewards = [r for rec in records for r in rec.rewards or [] if r is not None]
    return {
        "seconds": seconds,
        "load_s": load_s,
        "generations": sum(len(rec.generations) for rec in records),
        "mean_reward": sum(rewards) / len(rewards),
        "rss_after_load_mb": rss_loaded,
    }


def stage_train(config: Config, work: Path, variant: str) -> dict:
    placement, batching, sharing = variant.split("/")
    config.conditioning.placement = placement  # type: ignore[assignment]
    config.train.batches_by_prompt = batching == "by-prompt"
    policy, tokenizer, load_s = load_policy(config)
    it_dir = work / ("train-" + variant.replace("/", "-")) / "iter_001"
    it_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "scored.jsonl", it_dir / "scored.jsonl")
    # kl_coef 0: Quark never reads the reference, so no second copy of the weights is loaded.
    models = Models(policy, tokenizer, reference=policy)
    algorithm = ALGORITHMS[config.algorithm](config, models, Accelerator(cpu=True), None)
    rss_loaded = peak_rss_mb()
    prompts = [PromptRow(str(r.id), r.prompt) for r in load_samples(it_dir / "scored.jsonl")]
    unshared = mock.patch.object(trainer, "shared_prefix_target_logits", plain_target_logits)
    start = time.perf_counter()
    with (
        unshared if sharing == "unshared" else contextlib.nullcontext(),
        mock.patch.object(algorithm, "select", wraps=algorithm.select) as select,
    ):
        history = algorithm.update(1, it_dir, config.seed + 1, prompts)
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in history]
    return {
        "seconds": seconds,
        "load_s": load_s,
        "items": len(select.call_args.args[0]),
        "steps": len(history),
        "mean_loss": sum(losses) / len(losses),
        "rss_after_load_mb": rss_loaded,
    }


def run_stage(args: argparse.Namespace) -> None:
    """Worker: one stage in this process; its figures and peak RSS go to a JSON file."""
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(None, [*ALT_OVERRIDES, *args.set])
    work = Path(args.work_dir)
    kind, _, what = args.stage.partition(":")
    if kind == "sample":
        result = stage_sample(config, args, work, what)
    elif kind == "score":
        result = stage_score(config, work)
    else:
        result = stage_train(config, work, what)
    result = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_threads"] = torch.get_num_threads()
    result["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    (work / stage_file(args.stage)).write_text(json.dumps(result) + "\n")


def stage_file(stage: str) -> str:
    return "result-" + stage.replace(":", "-").replace("/", "-") + ".json"


def worker_argv(args: argparse.Namespace, stage: str, work: Path) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--work-dir"]
    argv += [str(work), "--data", args.data, "--num-prompts", str(args.num_prompts)]
    argv += ["--max-prompt-tokens", str(args.max_prompt_tokens), "--threads", str(args.threads)]
    return argv + (["--set", *args.set] if args.set else [])


def summarize(stages: dict[str, dict], variants: list[str]) -> dict:
    """Ratios between stages, and each training variant's whole iteration."""
    sampler, score = stages["sample:sampler"], stages["score"]
    out: dict = {"sampling": {"sampler_s": sampler["seconds"]}}
    if "sample:generate" in stages:
        generate = stages["sample:generate"]
        out["sampling"]["generate_s"] = generate["seconds"]
        out["sampling"]["speedup_vs_generate"] = round(generate["seconds"] / sampler["seconds"], 2)
        out["sampling"]["tokens_per_s_ratio"] = round(
            (sampler["new_tokens"] / sampler["seconds"])
            / (generate["new_tokens"] / generate["seconds"]),
            2,
        )
    baseline = stages.get(f"train:{BASELINE_TRAIN}")
    out["training"] = {}
    out["iteration"] = {}
    for variant in variants:
        train = stages[f"train:{variant}"]
        row = {
            "seconds": train["seconds"],
            "items_per_s": round(train["items"] / train["seconds"], 3),
        }
        if baseline is not None:
            row["speedup_vs_unshared"] = round(baseline["seconds"] / train["seconds"], 2)
        out["training"][variant] = row
        if variant == BASELINE_TRAIN and "sample:generate" in stages:
            parts = [stages["sample:generate"], score, train]
            name = f"baseline: generate + score + {variant}"
        elif variant == BASELINE_TRAIN:
            continue
        else:
            parts = [sampler, score, train]
            name = f"sampler + score + {variant}"
        total = sum(p["seconds"] for p in parts)
        out["iteration"][name] = {
            "seconds": round(total, 1),
            "sampling_s": parts[0]["seconds"],
            "scoring_s": score["seconds"],
            "training_s": train["seconds"],
            "peak_rss_mb": max(p["peak_rss_mb"] for p in parts),
            "vs_alt_reference": round(ALT_REFERENCE["iteration_s"] / total, 2),
            "meets_goal": total <= GOAL_S,
        }
    base = next((v for k, v in out["iteration"].items() if k.startswith("baseline")), None)
    for name, row in out["iteration"].items():
        if base is not None and not name.startswith("baseline"):
            row["speedup_vs_baseline"] = round(base["seconds"] / row["seconds"], 2)
    return out


def print_table(stages: dict[str, dict], summary: dict) -> None:
    head = f"{'stage':<34} {'seconds':>8} {'ratio':>22} {'peak RSS MB':>12}  detail"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in stages.items():
        ratio, detail = "", ""
        if name.startswith("sample:"):
            detail = f"{r['generations']} gens, {r['new_tokens']} new tokens"
            if name == "sample:sampler" and "speedup_vs_generate" in summary["sampling"]:
                ratio = f"{summary['sampling']['speedup_vs_generate']:.2f}x vs generate"
        elif name == "score":
            detail = f"{r['generations']} gens, mean reward {r['mean_reward']:.3f}"
        else:
            t = summary["training"][name.removeprefix("train:")]
            detail = f"{r['items']} items, {r['steps']} steps, {t['items_per_s']:.3f} items/s"
            if "speedup_vs_unshared" in t and not name.endswith(BASELINE_TRAIN):
                ratio = f"{t['speedup_vs_unshared']:.2f}x vs unshared"
        print(f"{name:<34} {r['seconds']:>8.1f} {ratio:>22} {r['peak_rss_mb']:>12.0f}  {detail}")
    print(
        f"\n{'iteration':<60} {'seconds':>8} {'vs baseline':>12} {'vs ALT 343 s':>13} "
        f"{'peak MB':>8}"
    )
    for name, r in summary["iteration"].items():
        speed = f"{r['speedup_vs_baseline']:.2f}x" if "speedup_vs_baseline" in r else ""
        print(
            f"{name:<60} {r['seconds']:>8.1f} {speed:>12} {r['vs_alt_reference']:>12.2f}x "
            f"{r['peak_rss_mb']:>8.0f}"
        )
    print(f"goal: one iteration <= {GOAL_S} s on an idle 2-core machine")


def write_report(
    args: argparse.Namespace,
    argv: list[str] | None,
    stages: dict[str, dict],
    variants: list[str],
    complete: bool,
) -> None:
    report = {
        "benchmark": "one Quark iteration (ALT reference configuration), stage by stage",
        "command": ".venv/bin/python benchmarks/bench_iteration.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "complete": complete,
        "config_overrides": [*ALT_OVERRIDES, *args.set],
        "data": args.data,
        "peak_rss": "ru_maxrss of each stage's own subprocess (model loading included)",
        "alt_reference": ALT_REFERENCE,
        "previous_measure": PREVIOUS,
        "goal_s": GOAL_S,
        "stages": stages,
        "summary": summarize(stages, variants),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_average": os.getloadavg(),
            "note": "stages run one after another; a shared machine's load hits them unevenly",
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="TL;DR JSONL (OpenAI layout)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-prompt-tokens", type=int, default=400, help="longer posts skipped")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides on top of the ALT settings, e.g. data.samples_per_prompt=4 "
        "sampling.max_new_tokens=16 sampling.prompt_batch_size=16",
    )
    parser.add_argument("--train-variants", nargs="*", default=TRAIN_VARIANTS)
    parser.add_argument("--no-generate", action="store_true", help="skip the generate baseline")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per stage (1: a shared 2-core machine thrashes with 2; 0: torch's "
        "default, all cores, as the loop runs)",
    )
    parser.add_argument("--work-dir", help="where samples and pools go (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "iteration.json"))
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage and exit
    args = parser.parse_args(argv)
    if args.stage:
        run_stage(args)
        return 0
    for variant in args.train_variants:
        if variant not in TRAIN_VARIANTS:
            parser.error(f"--train-variants: {variant!r} is none of {', '.join(TRAIN_VARIANTS)}")
    load_config(None, [*ALT_OVERRIDES, *args.set])  # a bad --set fails here, not in a worker
    stage_names = ["sample:sampler", "score"]
    stage_names += [] if args.no_generate else ["sample:generate"]
    stage_names += [f"train:{v}" for v in args.train_variants]
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir or stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        stages = {}
        env = {**os.environ, "TQDM_DISABLE": "1"}
        for name in stage_names:
            print(f"== {name}", flush=True)
            subprocess.run(worker_argv(args, name, work), check=True, env=env)
            stages[name] = json.loads((work / stage_file(name)).read_text())
            print(f"   {json.dumps(stages[name])}", flush=True)
            if "score" in stages:  # after every stage: a long run stopped early keeps its figures
                done = [v for v in args.train_variants if f"train:{v}" in stages]
                write_report(args, argv, stages, done, complete=len(stages) == len(stage_names))
    print_table(stages, summarize(stages, args.train_variants))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
