"""Argument groups shared by several commands (one definition, so flags never drift apart)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace

from transformers import PreTrainedTokenizerBase

from alignment.conditioning import Conditioning
from alignment.config import ModelConfig, SamplingConfig
from alignment.errors import UserError


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SamplingConfig()
    group = parser.add_argument_group("sampling")
    for f in fields(SamplingConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            group.add_argument(flag, type=type(default), default=default)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--dtype", default=ModelConfig.dtype, help="float32, float16 or bfloat16")
    group.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    try:
        config = SamplingConfig(**{f.name: getattr(args, f.name) for f in fields(SamplingConfig)})
    except ValueError as err:
        raise UserError(str(err)) from err
    check_backend(config)
    return config


def check_backend(config: SamplingConfig) -> None:
    """A sampling backend that cannot run here fails before any model loads."""
    if config.backend == "vllm":
        from samplers.vllm import require_vllm

        require_vllm()


def add_placement_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--placement",
        choices=["prefix", "suffix"],
        default=None,
        help="where the control goes (default: as the checkpoint's conditioning.json says; "
        "prefix for checkpoints without one)",
    )


def model_conditioning(
    model: str, tokenizer: PreTrainedTokenizerBase, placement: str | None
) -> Conditioning | None:
    """How `model` was trained to be conditioned; None (and a note) when it was not."""
    conditioning = Conditioning.load(model, tokenizer)
    if conditioning is None:
        print(f"note: {model} has no control tokens; generating unconditioned", file=sys.stderr)
        return None
    return replace(conditioning, placement=placement) if placement else conditioning


def format_best_of_n(rows: list[dict]) -> str:
    """The rows of `alignment.best_of_n.summarize_best_of_n` as a table, one line per N."""
    header = (
        f"{'N':>4}  {'reward (best of N)':>20}  {'KL est.':>7}  {'KL bound':>8}  {'samples':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        reward = f"{row['reward_mean']:.4f} +- {row['reward_stderr']:.4f}"
        lines.append(
            f"{row['n']:>4}  {reward:>20}  {row['kl_estimate']:>7.3f}  {row['kl_bound']:>8.3f}  "
            f"{row['samples']:>7}"
        )
    return "\n".join(lines)
