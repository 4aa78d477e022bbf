"""Argument groups shared by several commands (one definition, so flags never drift apart)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from alignment.config import SamplingConfig
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
    group.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    group.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    try:
        return SamplingConfig(**{f.name: getattr(args, f.name) for f in fields(SamplingConfig)})
    except ValueError as err:
        raise UserError(str(err)) from err
