"""`quark-alt train-rm`: fit a scalar reward model on human preference pairs with TRL.

Quark and ALT need a reward for every sample; for TL;DR that reward is a learned preference model.
This command trains one (Bradley-Terry loss, `trl.RewardTrainer`) and reports held-out pairwise
accuracy before and after training, so a user sees at once whether the model learned anything.

Truncation: we tokenize the text ourselves (TRL would *drop* over-long pairs, not cut them). A long
prompt is cut from the end of its body (the post), keeping its head (subreddit, title), its last
line (`TL;DR:`) and the whole summary; a summary alone longer than the window loses its start
(the tokenizer truncates from the left). A 512-token BERT then always sees the text it has to judge.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.errors import UserError
from alignment.io import atomic_directory, read_jsonl
from alignment.models import load_model, load_tokenizer
from rewards.base import encode_summary, pad_batch

log = logging.getLogger(__name__)

# CLI defaults (alignment/config.py has no reward-model section yet).
DEFAULT_EVAL_FRACTION = 0.1
DEFAULT_EPOCHS = 1
DEFAULT_BATCH_SIZE = 8
DEFAULT_LR = 5e-5
DEFAULT_MAX_LENGTH = 512
METRICS_FILE = "train_rm_metrics.json"
FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    group: str
    """Held-out split unit: the post id, or the line when the file has none."""


# ---- pure data handling ----
def load_pairs(path: str | Path, max_pairs: int | None = None) -> tuple[list[Pair], int]:
    """Validate the whole file first (a bad line 900 should fail before any training).

    Returns:
        (the first `max_pairs` usable pairs, how many pairs were dropped for chosen == rejected).
        Such pairs carry no preference and would only add loss log(2) with a zero gradient.
    """
    pairs: list[Pair] = []
    dropped = 0
    for lineno, row in read_jsonl(path):
        for field in FIELDS:
            if field not in row:
                raise UserError(f"{path}:{lineno}:{field}: missing field")
            if not isinstance(row[field], str):
                kind = type(row[field]).__name__
                raise UserError(f"{path}:{lineno}:{field}: expected a string, got {kind}")
        if row["chosen"].strip() == row["rejected"].strip():
            dropped += 1
            continue
        post = row.get("post_id")
        group = f"post:{post}" if post is not None else f"line:{lineno}"
        pairs.append(Pair(row["prompt"], row["chosen"], row["rejected"], group))
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    if len(pairs) < 2:
        raise UserError(
            f"{path}: {len(pairs)} usable pair(s), need at least 2 "
            f"({dropped} dropped because chosen == rejected)"
        )
    return pairs, dropped


def split_pairs(
    pairs: Sequence[Pair], eval_fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """Hold out whole posts: pairs on one post share its text, so a row split leaks it.

    Groups are sorted before the seeded shuffle, so the split depends on the seed and the set of
    posts, not on the file's row order. At least one group lands on each side.

    Returns:
        (train pairs, held-out pairs), each in file order.
    """
    groups = sorted({pair.group for pair in pairs})
    if len(groups) < 2:
        raise UserError("all pairs belong to one post; need at least 2 posts to hold one out")
    random.Random(seed).shuffle(groups)
    n_eval = min(len(groups) - 1, max(1, round(eval_fraction * len(groups))))
    held_out = set(groups[:n_eval])
    train = [pair for pair in pairs if pair.group not in held_out]
    return train, [pair for pair in pairs if pair.group in held_out]


def pairwise_accuracy(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Fraction of pairs with score(chosen) > score(rejected); a tie counts as wrong.

    Ties are wrong so that a constant scorer reads 0, not 0.5 or 1. Lists have length b.
    """
    if len(chosen_scores) != len(rejected_scores) or not chosen_scores:
        raise ValueError("need two equally long, non-empty score lists")
    wins = sum(c > r for c, r in zip(chosen_scores, rejected_scores, strict=True))
    return wins / len(chosen_scores)


def mean_margin(chosen_scores: Sequence[float], rejected_scores: Sequence[float]) -> float:
    """Mean score(chosen) - score(rejected): moves with learning even where accuracy saturates."""
    diffs = [c - r for c, r in zip(chosen_scores, rejected_scores, strict=True)]
    return sum(diffs) / len(diffs)


# ---- model side ----
def load_rm_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Right padding (BERT positions start at the first token) and left truncation.

    Left truncation is the fallback of `encode_summary` when a summary alone overflows.
    """
    tokenizer = load_tokenizer(name, padding_side="right")
    tokenizer.truncation_side = "left"
    return tokenizer


@torch.no_grad()
def score(
    model: PreTrainedModel,
    sequences: Sequence[list[int]],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
) -> list[float]:
    """Scalar reward per sequence, right-padded exactly as TRL's collator pads during training."""
    model.eval()
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = pad_batch(
            [{"input_ids": ids} for ids in sequences[start : start + batch_size]],
            tokenizer,
            model.device,
        )
        logits = model(**batch).logits
        scores.extend(logits[:, 0].float().cpu().tolist())
    return scores


def evaluate(
    model: PreTrainedModel,
    encoded: Sequence[tuple[list[int], list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
) -> tuple[float, float]:
    """(pairwise accuracy, mean margin) on encoded (chosen, rejected) pairs."""
    chosen = score(model, [c for c, _ in encoded], tokenizer, batch_size)
    rejected = score(model, [r for _, r in encoded], tokenizer, batch_size)
    return pairwise_accuracy(chosen, rejected), mean_margin(chosen, rejected)


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    encoded: Sequence[tuple[list[int], list[int]]],
    args: argparse.Namespace,
    work_dir: Path,
) -> float:
    """Run TRL's RewardTrainer on pre-tokenized pairs; return the mean training loss.

    Pre-tokenized `chosen_ids`/`rejected_ids` make TRL skip its own EOS appending (BERT has no EOS)
    and its max_length filter (which would drop long posts instead of cutting them).
    """
    from datasets import Dataset  # slow imports, only for the command that trains
    from trl import RewardConfig, RewardTrainer

    dataset = Dataset.from_dict(
        {"chosen_ids": [c for c, _ in encoded], "rejected_ids": [r for _, r in encoded]}
    )
    config = RewardConfig(
        output_dir=str(work_dir),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        max_length=args.max_length,
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,  # TRL defaults to bf16 mixed precision; CPUs and tests want float32
        activation_checkpointing=False,  # small encoders: recomputing costs more than it saves
        dataloader_pin_memory=torch.cuda.is_available(),
        save_strategy="no",
        report_to="none",
        logging_steps=10,
    )
    trainer = RewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    return float(trainer.train().training_loss)


# ---- command ----
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True, help="JSONL with prompt, chosen, rejected")
    parser.add_argument("--model", required=True, help="hub id, local folder or embedded: name")
    parser.add_argument("--output", required=True, type=Path, help="folder for the trained model")
    parser.add_argument("--eval-fraction", type=float, default=DEFAULT_EVAL_FRACTION)
    parser.add_argument("--epochs", type=float, default=DEFAULT_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens")
    parser.add_argument("--max-pairs", type=int, default=None, help="use the first N pairs")
    parser.add_argument("--seed", type=int, default=0)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 < args.eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    for flag, value in (
        ("--epochs", args.epochs),
        ("--batch-size", args.batch_size),
        ("--lr", args.lr),
    ):
        if value <= 0:
            raise UserError(f"{flag} must be > 0, got {value}")
    if args.max_length < 8:
        raise UserError(f"--max-length must be >= 8, got {args.max_length}")
    if args.max_pairs is not None and args.max_pairs < 2:
        raise UserError(f"--max-pairs must be >= 2, got {args.max_pairs}")
    output: Path = args.output
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise UserError(f"{output}: already exists; remove it or choose another --output")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    _check_args(args)
    pairs, dropped = load_pairs(args.pairs, args.max_pairs)
    if dropped:
        log.warning("dropped %d pair(s) whose chosen and rejected texts are identical", dropped)
    train_pairs, eval_pairs = split_pairs(pairs, args.eval_fraction, args.seed)

    tokenizer = load_rm_tokenizer(args.model)
    torch.manual_seed(args.seed)  # the fresh score head is random
    model = load_model(args.model, head="sequence-classification", num_labels=1)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and args.max_length > positions:
        raise UserError(f"--max-length {args.max_length} exceeds the model's {positions} positions")
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # for the score before

    def encode_all(subset: list[Pair]) -> list[tuple[list[int], list[int]]]:
        return [
            (
                encode_summary(tokenizer, p.prompt, p.chosen, args.max_length),
                encode_summary(tokenizer, p.prompt, p.rejected, args.max_length),
            )
            for p in subset
        ]

    train_ids, eval_ids = encode_all(train_pairs), encode_all(eval_pairs)
    acc_before, margin_before = evaluate(model, eval_ids, tokenizer, args.batch_size)
    log.info("held-out accuracy before training: %.3f (%d pairs)", acc_before, len(eval_ids))

    # ---- train into a hidden temp folder beside --output; rename only once all is written ----
    output: Path = args.output
    with atomic_directory(output) as tmp:
        train_started = time.monotonic()
        train_loss = train(model, tokenizer, train_ids, args, tmp / "trainer")
        train_seconds = time.monotonic() - train_started
        acc_after, margin_after = evaluate(model, eval_ids, tokenizer, args.batch_size)
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)  # safetensors is the only format transformers 5 writes
        tokenizer.save_pretrained(tmp)
        metrics = {
            "model": args.model,
            "pairs_file": str(args.pairs),
            "split_by": "post_id" if eval_pairs[0].group.startswith("post:") else "row",
            "train_pairs": len(train_ids),
            "eval_pairs": len(eval_ids),
            "dropped_identical": dropped,
            "accuracy_before": acc_before,
            "accuracy_after": acc_after,
            "margin_before": margin_before,
            "margin_after": margin_after,
            "train_loss": train_loss,
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.monotonic() - started, 1),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "max_length": args.max_length,
            "seed": args.seed,
        }
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    print(
        f"train-rm: {len(train_ids)} train / {len(eval_ids)} held-out pairs "
        f"(split by {metrics['split_by']}, {dropped} identical dropped)\n"
        f"held-out pairwise accuracy: {acc_before:.3f} -> {acc_after:.3f}  "
        f"(margin {margin_before:+.3f} -> {margin_after:+.3f})\n"
        f"trained in {train_seconds:.0f} s, total {metrics['total_seconds']:.0f} s; saved {output}"
    )
    return 0
