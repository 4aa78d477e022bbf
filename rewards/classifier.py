"""Any Hugging Face sequence classifier as a reward: sentiment, toxicity, a trained TL;DR RM.

The score is one logit (or its softmax/sigmoid probability) of the classifier's output, chosen
by label index or name, so a two-class sentiment model and a one-logit reward model load the
same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from alignment.errors import UserError
from alignment.models import default_device, load_model_and_tokenizer, quantization_config
from rewards.base import (
    RewardBase,
    Scores,
    check_pairs,
    encode_summary,
    pad_batch,
    score_by_length,
)

Activation = Literal["none", "softmax", "sigmoid"]
DEFAULT_TEMPLATE = "{prompt} {completion}"
# Position limits above this are tokenizer placeholders ("no limit"), not real ones.
_NO_LIMIT = 1_000_000


class ClassifierReward(RewardBase):
    """Reward = logit `label` of an AutoModelForSequenceClassification on prompt + completion.

    Args:
        model: hub id, local folder or `embedded:` name.
        template: how prompt and completion become one text (both stripped first).
        pair: feed (prompt, completion) as two segments instead (BERT-style cross-encoders);
            `template` is then unused.
        label: index or name (from the model's id2label) of the logit to read. Required when the
            model has more than one label: guessing "positive" would silently invert a reward.
        activation: "none" reads the raw logit; "softmax"/"sigmoid" give a probability.
        max_length: token budget; defaults to the model's position limit. Long inputs never lose
            the completion: the default template cuts the end of the post and keeps the prompt's
            head and `TL;DR:` line (as `quark-alt train-rm` trains), a custom template loses the
            start of the text, pair mode the start of the prompt.
        batch_size: sequences per forward pass (batched by length).
        quantization: `8bit` or `4bit` to load the frozen classifier through bitsandbytes
            (CUDA or CPU).
    """

    def __init__(
        self,
        model: str,
        *,
        template: str = DEFAULT_TEMPLATE,
        pair: bool = False,
        label: int | str | None = None,
        activation: Activation = "none",
        max_length: int | None = None,
        batch_size: int = 32,
        device: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        quantization: str | None = None,
    ) -> None:
        if activation not in ("none", "softmax", "sigmoid"):
            raise UserError(f"activation must be none, softmax or sigmoid, got {activation!r}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if not pair and ("{prompt}" not in template or "{completion}" not in template):
            raise UserError(f"template {template!r} must contain {{prompt}} and {{completion}}")
        self.name = model
        self.template, self.pair, self.activation = template, pair, activation
        self.batch_size = batch_size
        self.device = device or default_device()
        self.model, self.tokenizer = load_model_and_tokenizer(
            model,
            head="sequence-classification",
            dtype=dtype,
            device=self.device,
            trust_remote_code=trust_remote_code,
            padding_side="right",
            quantization=quantization_config(quantization, "reward quantization"),
        )
        # Classifiers that pool the last non-pad token (GPT-2 family) need the pad id in config.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label_index = resolve_label(self.model.config.id2label, label, model)
        self.max_length = max_length or _position_limit(self.model.config, self.tokenizer)
        self.tokenizer.truncation_side = "left"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Scores:
        check_pairs(prompts, completions)
        if self.pair:
            encoded = self.tokenizer(
                [p.strip() for p in prompts],
                [c.strip() for c in completions],
                truncation="only_first",
                max_length=self.max_length,
            )
            items = [{k: encoded[k][i] for k in encoded} for i in range(len(completions))]
        elif self.template == DEFAULT_TEMPLATE:
            # Exactly how `quark-alt train-rm` encoded its training pairs, so a model trained
            # there scores the same text here (a long post is cut, the summary kept).
            items = [
                {"input_ids": encode_summary(self.tokenizer, p.strip(), c.strip(), self.max_length)}
                for p, c in zip(prompts, completions, strict=True)
            ]
        else:
            texts = [
                self.template.format(prompt=p.strip(), completion=c.strip())
                for p, c in zip(prompts, completions, strict=True)
            ]
            encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            items = [{k: encoded[k][i] for k in encoded} for i in range(len(completions))]

        def score_batch(indices: list[int]) -> list[float]:
            batch = pad_batch([items[i] for i in indices], self.tokenizer, self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits.float()
            if self.activation == "softmax":
                logits = logits.softmax(dim=-1)
            elif self.activation == "sigmoid":
                logits = logits.sigmoid()
            return logits[:, self.label_index].tolist()

        lengths = [len(item["input_ids"]) for item in items]
        return score_by_length(lengths, self.batch_size, score_batch, self.sort_by_length)


def resolve_label(id2label: Mapping[Any, str] | None, label: int | str | None, model: str) -> int:
    """The logit index for `label` (an index, a digit string, or a name from id2label)."""
    names = {int(i): str(n) for i, n in (id2label or {0: "LABEL_0"}).items()}
    known = ", ".join(f"{i}={n}" for i, n in sorted(names.items()))
    if label is None:
        if len(names) == 1:
            return next(iter(names))
        raise UserError(f"{model} has {len(names)} labels ({known}); choose one with label=NAME")
    if isinstance(label, str) and not label.isdigit():
        matches = [i for i, n in names.items() if n.lower() == label.lower()]
        if not matches:
            raise UserError(f"{model} has no label {label!r}; labels: {known}")
        return matches[0]
    index = int(label)
    if index not in names:
        raise UserError(f"{model} has no label index {index}; labels: {known}")
    return index


def _position_limit(config: object, tokenizer: object) -> int:
    limits = [
        value
        for value in (
            getattr(config, "max_position_embeddings", None),
            getattr(tokenizer, "model_max_length", None),
        )
        if isinstance(value, int) and 0 < value < _NO_LIMIT
    ]
    return min(limits) if limits else 512
