"""The `quark-alt` console script: parse arguments, hand them to one command module, map errors.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; the
modules are imported only when their command runs, so `quark-alt --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from alignment.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("experiments.commands.train", "run the sample -> score -> quantile -> train loop"),
    "sample": ("experiments.commands.sample", "draw K generations per prompt into a samples file"),
    "score": ("rewards.cli", "add rewards and per-prompt quantiles to a samples file"),
    "merge": ("experiments.commands.merge", "join the files of a --shard i/n fan-out into one"),
    "generate": ("experiments.commands.generate", "generate conditioned on _QUANTILE_TOKEN_0_"),
    "eval": ("experiments.commands.eval", "compare policies on held-out prompts (paired)"),
    "report": ("experiments.commands.report", "one self-contained HTML page comparing runs"),
    "train-rm": ("rewards.train_rm", "train a reward model from preference pairs"),
    "config": ("experiments.commands.config", "print a resolved training config"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quark-alt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (torch and transformers are slow to load).
        if name == wanted:
            importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)  # argparse exits with status 2 on bad usage
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # accelerate narrates every file of a saved training state
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except UserError as err:
        print(f"quark-alt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
