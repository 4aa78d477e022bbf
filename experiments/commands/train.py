"""`quark-alt train CONFIG [key=value ...]`: the whole loop; rerunning the same command resumes."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState

from alignment.algorithms.best_of_n import RESULT, SAMPLES
from alignment.config import Config, load_config
from alignment.loop import run as run_loop
from alignment.models import on_cpu
from experiments.commands.common import check_backend, format_best_of_n
from rewards import load_reward
from rewards.feedback import (
    ALT_LMC_PROMPT,
    ALT_SUMMARY_PROMPT,
    HH_CATEGORIES,
    STEERLM_HH_ATTRIBUTES,
    STEERLM_HH_TEXTS,
    CategoryParser,
    ChatFeedback,
    Feedback,
    FeedbackPrompt,
    FeedbackProvider,
    HFFeedback,
    ReplyParser,
    parse_alt_reply,
)
from rewards.llm_client import ChatClient
from samplers import make_sampler

ALT_MAX_SCORE = 3  # ALT-LMU's prompt asks for a score out of 3


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
    check_backend(config.sampling)
    # Under `accelerate launch` the process group comes first: it makes "cuda" mean this rank's
    # GPU for the reward model as for the policy; the loop's Accelerator reuses this state.
    state = PartialState(cpu=on_cpu(config.model.device))
    options: dict[str, object] = dict(config.reward.options)
    if config.reward.quantization is not None:
        options["quantization"] = config.reward.quantization
    reward = load_reward(
        config.reward.name,
        batch_size=config.reward.batch_size,
        device=config.model.device,
        **options,
    )
    feedback = build_feedback(config) if config.algorithm == "alt-feedback" else None
    metrics = run_loop(config, reward.score, make_sampler, feedback)
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


@dataclass
class ProviderFeedback:
    """A feedback provider in the shape alt-feedback takes (`alignment.interfaces.FeedbackFn`)."""

    provider: FeedbackProvider
    max_score: int
    texts: tuple[str, ...] | None

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Feedback | None]:
        return self.provider.feedback(prompts, completions)


def build_feedback(config: Config) -> ProviderFeedback:
    """The `feedback_provider` section as a provider and its parser (presets where null)."""
    fp = config.feedback_provider
    parser: ReplyParser = parse_alt_reply
    max_score, texts = ALT_MAX_SCORE, None
    if fp.parser != "alt":
        labels = fp.categories if fp.categories is not None else list(HH_CATEGORIES)
        steer = fp.parser == "steerlm"
        strings = fp.attributes if fp.attributes is not None else list(STEERLM_HH_TEXTS.values())
        category = CategoryParser(
            labels,
            dict(zip(labels, strings, strict=True)) if steer else None,
            STEERLM_HH_ATTRIBUTES if steer else None,
        )
        parser, max_score = category, len(labels) - 1
        texts = tuple(dict.fromkeys(f.text for f in category.by_key.values()))  # best first
    # categories of your own come with their own prompt (the config checks it)
    prompt = ALT_SUMMARY_PROMPT if fp.parser == "alt" else ALT_LMC_PROMPT
    if fp.prompt is not None:
        prompt = FeedbackPrompt(fp.prompt, fp.system)
    provider: FeedbackProvider
    if fp.kind == "chat":
        client = ChatClient(
            fp.base_url,
            fp.model,
            api_key_env=fp.api_key_env,
            params={"temperature": fp.temperature, "max_tokens": fp.max_new_tokens},
            timeout=fp.timeout,
            max_retries=fp.max_retries,
            max_workers=fp.max_workers,
            cache_dir=fp.cache_dir or Path(config.out_dir) / "feedback_cache",
        )
        provider = ChatFeedback(client, prompt, parser)
    else:
        provider = HFFeedback(
            fp.model,
            prompt=prompt,
            parser=parser,
            max_new_tokens=fp.max_new_tokens,
            batch_size=fp.batch_size,
            line_breaks=fp.line_breaks,
            device=config.model.device,
            dtype=config.model.dtype,
            trust_remote_code=config.model.trust_remote_code,
        )
    return ProviderFeedback(provider, max_score, texts)


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
