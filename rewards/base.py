"""The reward contract and the length-bucketed batching every model-backed reward shares.

A reward is anything that maps (prompts, completions) to one float or None per completion, in
input order, with no I/O. That is trl's reward-function convention, so the same object serves the
Quark/ALT loop (through `score`), the scoring CLI, and trl's GRPO/RLOO trainers (through
`__call__`). None means "could not score"; quantiles then skip that generation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from alignment.errors import UserError

Scores = list[float | None]


@runtime_checkable
class Reward(Protocol):
    """Scores completions of prompts. `score` is the library call, `__call__` is trl's."""

    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Scores:
        """One score per (prompt, completion) pair, same order; batched inside, no I/O."""
        ...

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> Scores: ...


class RewardBase:
    """Gives a backend trl's calling convention and display name on top of its `score`.

    trl calls `reward(prompts=..., completions=..., completion_ids=..., **dataset_columns)` and
    names the metric after `__name__`; the extra keyword arguments are not needed here.
    """

    name: str = "reward"
    sort_by_length: bool = True
    """Batch by length; False keeps input order (only to measure what sorting buys)."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Scores:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> Scores:
        return self.score([as_text(p) for p in prompts], [as_text(c) for c in completions])

    @property
    def __name__(self) -> str:
        return self.name


def as_text(item: Any) -> str:
    """A plain string, or trl's conversational form (a list of {"role", "content"} messages)."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and all(isinstance(m, dict) and "content" in m for m in item):
        return "\n".join(str(m["content"]) for m in item)
    raise TypeError(f"expected a string or a list of chat messages, got {type(item).__name__}")


def check_pairs(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


def check_scores(scores: Any, expected: int, name: str) -> Scores:
    """Validate what a reward returned: a list of `expected` numbers or None (NaN/inf allowed).

    Non-finite values pass through on purpose: the caller decides whether to count them (the
    CLI reports them) before they become None on disk.
    """
    if not isinstance(scores, list | tuple):
        raise UserError(f"reward {name!r} returned {type(scores).__name__}, not a list")
    if len(scores) != expected:
        raise UserError(
            f"reward {name!r} returned {len(scores)} rewards for {expected} generations"
        )
    out: Scores = []
    for value in scores:
        if value is None:
            out.append(None)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            try:  # numpy and 0-d torch scalars
                out.append(float(value))
            except (TypeError, ValueError):
                raise UserError(
                    f"reward {name!r} returned a {type(value).__name__}, not a number"
                ) from None
        else:
            out.append(float(value))
    return out


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def length_batches(lengths: Sequence[int], batch_size: int, sort: bool = True) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first.

    Padding is wasted compute, so items are sorted by length before batching; the longest batch
    runs first so an out-of-memory error shows up at once rather than at the end. `sort=False`
    gives plain consecutive batches (the baseline the benchmark compares against).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(lengths)))
    if sort:
        order.sort(key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def score_by_length(
    lengths: Sequence[int],
    batch_size: int,
    score_batch: Callable[[list[int]], Sequence[float | None]],
    sort: bool = True,
) -> Scores:
    """Run `score_batch` on length-sorted batches of indices and return results in input order."""
    out: Scores = [None] * len(lengths)
    for batch in length_batches(lengths, batch_size, sort):
        for index, value in zip(batch, score_batch(batch), strict=True):
            out[index] = value
    return out


def pad_batch(
    encodings: Sequence[dict[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device,
) -> dict[str, torch.Tensor]:
    """Right-pad token lists into (b, t) tensors with the tokenizer's own padding.

    Right, whatever the tokenizer's side: reward models read the first or the last real token
    by position, and all of ours count positions from the start.

    Returns:
        The same keys as the encodings plus `attention_mask`, each a (b, t) long tensor.
    """
    batch = tokenizer.pad(
        [dict(e) for e in encodings], padding=True, padding_side="right", return_tensors="pt"
    )
    return {key: value.to(device) for key, value in batch.items()}


class FunctionReward(RewardBase):
    """Any trl-style reward function `(prompts, completions, **kwargs) -> list[float | None]`.

    `options` are passed to every call as fixed keyword arguments (how trl passes dataset
    columns); `batch_size` splits large inputs into several calls.
    """

    def __init__(
        self,
        function: Callable[..., Any],
        name: str | None = None,
        *,
        batch_size: int | None = None,
        **options: Any,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.function = function
        self.name = name or str(getattr(function, "__name__", type(function).__name__))
        self.batch_size = batch_size
        self.options = options

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Scores:
        check_pairs(prompts, completions)
        step = self.batch_size or max(len(completions), 1)
        out: Scores = []
        for start in range(0, len(completions), step):
            chunk = list(completions[start : start + step])
            result = self.function(
                prompts=list(prompts[start : start + step]), completions=chunk, **self.options
            )
            out.extend(check_scores(result, len(chunk), self.name))
        return out


def encode_summary(
    tokenizer: PreTrainedTokenizerBase, prompt: str, summary: str, max_length: int
) -> list[int]:
    """Token ids of `prompt + " " + summary`, at most `max_length`, cut in the post.

    A reward model must see the whole summary, so an over-long input loses the end of the post,
    never the summary (summaries are what is being compared).

    The prompt's last line (`TL;DR:`) stays attached to the summary; the rest of the prompt keeps
    as many leading tokens as fit. Expects left truncation for the rare case
    where the summary alone overflows, or where re-tokenizing the cut text shifts a token.
    """
    head, newline, last_line = prompt.rpartition("\n")
    tail = f"{last_line} {summary}"
    tail_len = len(tokenizer(tail, add_special_tokens=False, verbose=False)["input_ids"])
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False) - tail_len
    # verbose=False: the untruncated head may be longer than the model; that is why we cut it
    head_enc = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = head_enc["offset_mapping"]
    if len(offsets) > room:
        head = head[: offsets[room - 1][1]] if room > 0 else ""
    return tokenizer(head + newline + tail, truncation=True, max_length=max_length)["input_ids"]
