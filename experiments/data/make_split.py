"""Split the TL;DR dev set (`--source`) by post into train / validation / held-out files.

    .venv/bin/python experiments/data/make_split.py [--source F] [--out-dir D] [--stats]

Rule: identical posts (same text up to whitespace) are merged first, keeping the first row, so
no post text lands in two files; the remaining rows are ordered by the SHA-256 of their `id`, the
first HELDOUT go to tldr_heldout.jsonl, the next VALIDATION to tldr_validation.jsonl and the rest
to tldr_train.jsonl. Each file keeps its rows in source order and each line byte for byte, so a
rerun on the same source rewrites identical files. `--stats` prints prompt lengths in SmolLM2
tokens (the figures in README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

from alignment.io import atomic_write
from alignment.models import load_tokenizer
from alignment.prompts import load_prompts

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SOURCE = REPO.parent / "shared" / "data" / "tldr_dev.jsonl"
HELDOUT, VALIDATION = 128, 128
SPLITS = ("train", "validation", "heldout")


def post_key(row: dict) -> str:
    return " ".join(row["post"].split())


def split_lines(lines: list[str]) -> dict[str, list[str]]:
    """The split's lines, each in source order; see the module docstring for the rule."""
    seen: set[str] = set()
    kept: list[tuple[str, int]] = []  # (id hash, source index)
    for index, line in enumerate(lines):
        row = json.loads(line)
        if post_key(row) in seen:
            continue
        seen.add(post_key(row))
        kept.append((hashlib.sha256(row["id"].encode("utf-8")).hexdigest(), index))
    if len(kept) <= HELDOUT + VALIDATION:
        raise SystemExit(f"only {len(kept)} distinct posts: nothing left to train on")
    ranked = [index for _, index in sorted(kept)]
    chosen = {
        "heldout": ranked[:HELDOUT],
        "validation": ranked[HELDOUT : HELDOUT + VALIDATION],
        "train": ranked[HELDOUT + VALIDATION :],
    }
    return {name: [lines[i] for i in sorted(chosen[name])] for name in SPLITS}


def write_split(source: Path, out_dir: Path) -> dict[str, Path]:
    # "\n" only: splitlines() would also split inside strings holding U+2028 and friends
    lines = [line for line in source.read_text(encoding="utf-8").split("\n") if line.strip()]
    paths = {}
    for name, rows in split_lines(lines).items():
        paths[name] = out_dir / f"tldr_{name}.jsonl"
        with atomic_write(paths[name]) as handle:
            handle.writelines(line + "\n" for line in rows)
    return paths


def print_stats(paths: dict[str, Path]) -> None:
    """Prompt lengths (the standard TL;DR prompt) in SmolLM2 tokens, per file."""
    tokenizer = load_tokenizer("embedded:smollm2-135m-instruct")
    print("| file | posts | bytes | prompt tokens: mean | median | p90 | max | > 512 |")
    print("|---|---|---|---|---|---|---|---|")
    for path in paths.values():
        rows = load_prompts(path)
        lengths = sorted(len(tokenizer(r.prompt)["input_ids"]) for r in rows)
        p90 = lengths[int(0.9 * (len(lengths) - 1))]
        print(
            f"| `{path.name}` | {len(rows)} | {path.stat().st_size} | "
            f"{statistics.mean(lengths):.0f} | {statistics.median(lengths):.0f} | {p90} | "
            f"{lengths[-1]} | {sum(n > 512 for n in lengths)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--stats", action="store_true", help="print SmolLM2 prompt lengths")
    args = parser.parse_args()
    paths = write_split(args.source, args.out_dir)
    for path in paths.values():
        print(f"wrote {path}")
    if args.stats:
        print_stats(paths)


if __name__ == "__main__":
    main()
