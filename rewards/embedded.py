"""The offline demo reward: TL;DR summary quality from a small sentence encoder (MiniLM-L6).

What it rewards, per summary s of post p (words = lower-cased \\w+ tokens):

    reward = cos(E(s), E(p))                              coverage: says what the post says
             - copy       * copy_rate(s, p)               verbatim word 3-grams from the post
             - repetition * (1 - distinct_ratio(s))       looped phrases (distinct word 2-grams)
             - length     * max(0, |s|/|p| - max_ratio)   longer than max_ratio of the post
             - short      * max(0, 1 - |s|/min_words)     fewer than min_words words

E = all-MiniLM-L6-v2 mean-pooled, L2-normalised embeddings (post truncated to 256 tokens,
summary to 128); p is the post body (after "POST:", before "TL;DR:"), without title.

An empty or whitespace-only summary scores `empty` (-1) rather than None: it is a real, bad
output the policy must learn to avoid. Everything else passes through a soft floor,
empty + softness * (z + sqrt(z^2 + 4)) / 2 with z = (reward - empty) / softness: monotone,
within 0.005 of the reward above -0.5, and always above `empty`, so an empty answer never beats
a long bad one. Every term is continuous in its statistic, so two summaries of one prompt that
differ a little get rewards that differ a little: the within-prompt ranking Quark and ALT learn
from.

Mean reward over the first 100 posts of the TL;DR dev set that experiments/data is split from
(and how often the human TL;DR of a post beats that variant): human TL;DR +0.50; post title
+0.44 (61%); first 30 words of the post +0.11 (100%); another post's TL;DR +0.10 (97%); the
whole post -0.35 (100%); the TL;DR's first 4 words looped 12 times -0.76 (100%); empty -1
(100%).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AutoModel, AutoTokenizer

from alignment.errors import UserError
from alignment.models import default_device, resolve_model_path
from rewards.base import RewardBase, Scores, check_pairs, length_batches, pad_batch
from rewards.functions import copy_rate, distinct_ratio, post_body, words


@dataclass(frozen=True)
class SummaryWeights:
    """The penalty weights of the formula in the module docstring."""

    copy: float = 0.4
    repetition: float = 1.0
    length: float = 1.0
    max_ratio: float = 0.3
    short: float = 0.3
    min_words: int = 6
    empty: float = -1.0
    softness: float = 0.05


def summary_reward(similarity: float, summary: str, post: str, w: SummaryWeights) -> float:
    """Combine the embedding similarity with the surface penalties (module docstring)."""
    n_words = len(words(summary))
    if n_words == 0:
        return w.empty
    ratio = n_words / max(len(words(post)), 1)
    raw = (
        similarity
        - w.copy * copy_rate(summary, post)
        - w.repetition * (1.0 - distinct_ratio(summary))
        - w.length * max(0.0, ratio - w.max_ratio)
        - w.short * max(0.0, 1.0 - n_words / w.min_words)
    )
    # Soft floor (a hyperbola): monotone, so rankings are unchanged; within 0.005 of raw above
    # -0.5; always above `empty`, so an empty answer never beats a long bad one.
    z = (raw - w.empty) / w.softness
    return w.empty + w.softness * (z + math.sqrt(z * z + 4.0)) / 2.0


class EmbeddedSummaryReward(RewardBase):
    """The reward of the module docstring on a BERT-style sentence encoder (default MiniLM-L6).

    Post embeddings are cached (least recently used first out), since every generation of a
    prompt, and the same prompts in later iterations, share one post.

    Args:
        model: encoder name or folder; loaded with transformers AutoModel, no remote code.
        weights: penalty weights as keyword arguments (copy=0.5, ...), see SummaryWeights.
    """

    def __init__(
        self,
        model: str = "embedded:minilm-l6",
        *,
        batch_size: int = 64,
        post_max_length: int = 256,
        summary_max_length: int = 128,
        cache_size: int = 4096,
        device: str | None = None,
        **weights: float,
    ) -> None:
        try:
            self.weights = SummaryWeights(**weights)  # type: ignore[arg-type]
        except TypeError as err:
            raise UserError(
                f"embedded reward: {err}; weights: copy, repetition, length, "
                "max_ratio, short, min_words, empty"
            ) from err
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.name = "embedded-summary"
        self.batch_size, self.cache_size = batch_size, cache_size
        self.post_max_length, self.summary_max_length = post_max_length, summary_max_length
        self.device = device or default_device()
        path = resolve_model_path(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.encoder = AutoModel.from_pretrained(path).to(self.device).eval()
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load sentence encoder {model!r}: {err}") from err
        if self.tokenizer.pad_token_id is None:
            raise UserError(f"tokenizer of {model!r} lacks a pad token")
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def embed(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings, shape (n, d), batched by length."""
        rows = torch.empty(len(texts), self.encoder.config.hidden_size)
        if not texts:
            return rows
        encoded = self.tokenizer(list(texts), truncation=True, max_length=max_length)
        items = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
        lengths = [len(ids) for ids in encoded["input_ids"]]
        for indices in length_batches(lengths, self.batch_size, sort=self.sort_by_length):
            batch = pad_batch([items[i] for i in indices], self.tokenizer, self.device)
            with torch.inference_mode():
                hidden = self.encoder(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows[indices] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return rows

    def _post_embeddings(self, posts: Sequence[str]) -> dict[str, torch.Tensor]:
        new = [p for p in dict.fromkeys(posts) if p not in self._cache]
        if new:
            for post, row in zip(new, self.embed(new, self.post_max_length), strict=True):
                self._cache[post] = row
        found = {}
        for post in dict.fromkeys(posts):
            self._cache.move_to_end(post)
            found[post] = self._cache[post]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return found

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Scores:
        check_pairs(prompts, completions)
        posts = [post_body(p) for p in prompts]
        summaries = [c.strip() for c in completions]
        todo = [i for i, s in enumerate(summaries) if words(s)]
        post_rows = self._post_embeddings([posts[i] for i in todo])
        summary_rows = self.embed([summaries[i] for i in todo], self.summary_max_length)
        similarity = {
            i: float(row @ post_rows[posts[i]]) for i, row in zip(todo, summary_rows, strict=True)
        }
        return [
            summary_reward(similarity.get(i, 0.0), s, p, self.weights)
            for i, (s, p) in enumerate(zip(summaries, posts, strict=True))
        ]
