"""`quark-alt train CONFIG [key=value ...]`: the whole loop; rerunning the same command resumes."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from accelerate import PartialState

from alignment.algorithms.best_of_n import RESULT, SAMPLES
from alignment.config import load_config
from alignment.loop import run as run_loop
from experiments.commands.common import format_best_of_n
from rewards import load_reward
from samplers import HFSampler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        help="YAML file with what differs from the defaults; "
        "'-' for none (defaults and overrides only)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. train.learning_rate=1e-4",
    )


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    # Under `accelerate launch` the process group comes first: it makes "cuda" mean this rank's
    # GPU for the reward model as for the policy; the loop's Accelerator reuses this state.
    state = PartialState(cpu=config.model.device == "cpu")
    options: dict[str, object] = dict(config.reward.options)
    if config.reward.quantization is not None:
        options["quantization"] = config.reward.quantization
    reward = load_reward(
        config.reward.name,
        batch_size=config.reward.batch_size,
        device=config.model.device,
        **options,
    )
    metrics = run_loop(config, reward.score, HFSampler)
    if not state.is_main_process:
        return 0
    print(format_table(metrics))
    if config.algorithm == "best-of-n":
        result = json.loads((Path(config.out_dir) / RESULT).read_text())
        print(f"best of N on {result['num_prompts']} eval prompts (initial policy):")
        print(format_best_of_n(result["best_of_n"]))
        print(f"run directory: {config.out_dir} ({RESULT}, {SAMPLES}, metrics.jsonl)")
        return 0
    print(f"run directory: {config.out_dir} (metrics.jsonl, plots/, checkpoints/)")
    return 0


def format_table(metrics: list[dict]) -> str:
    """Held-out reward (sampled mean +- stderr; greedy), ref perplexity, KL and length."""
    header = (
        f"{'iter':>4}  {'reward (sampled)':>18}  {'greedy':>7}  {'ref ppl':>8}  "
        f"{'KL':>7}  {'length':>6}"
    )
    lines = [header, "-" * len(header)]
    for row in metrics:
        sampled = f"{row['reward_mean']:.3f} +- {row['reward_stderr']:.3f}"
        greedy = row.get("greedy_reward_mean", math.nan)
        lines.append(
            f"{row['iteration']:>4}  {sampled:>18}  {greedy:>7.3f}  "
            f"{row['ref_perplexity']:>8.2f}  {row['kl']:>7.2f}  {row['length']:>6.1f}"
        )
    return "\n".join(lines)
