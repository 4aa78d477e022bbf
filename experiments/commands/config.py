"""`quark-alt config CONFIG [key=value ...]`: print the resolved config.

Defaults from alignment/config.py, then the file, then the overrides.
"""

from __future__ import annotations

import argparse

from alignment.config import dump_config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file (omit to print the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0
