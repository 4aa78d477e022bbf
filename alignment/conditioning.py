"""Control tokens `_QUANTILE_TOKEN_k_` (0 = best) and the conditioned prompt built from them.

One pair of functions, `condition_prompt` / `strip_condition`, is used by the sampler, the
trainer, evaluation and `quark-alt generate`, so the string seen at training time is exactly the
one seen at inference time (reference spec pitfall 14).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Placement = Literal["prefix", "suffix"]
QUANTILE_TOKEN_RE = re.compile(r"_QUANTILE_TOKEN_(\d+)_")


def quantile_token(k: int) -> str:
    """The control string of quantile k (0 = highest rewards)."""
    if k < 0:
        raise ValueError(f"quantile index must be >= 0, got {k}")
    return f"_QUANTILE_TOKEN_{k}_"


def quantile_tokens(num_quantiles: int) -> list[str]:
    if num_quantiles < 1:
        raise ValueError(f"num_quantiles must be >= 1, got {num_quantiles}")
    return [quantile_token(k) for k in range(num_quantiles)]


def condition_prompt(prompt: str, control: str, placement: Placement = "prefix") -> str:
    """Attach `control` to a raw prompt.

    `prefix` is ALT's layout (`_QUANTILE_TOKEN_0_SUBREDDIT: ...`, no space; a tokenizer that adds
    BOS puts the token right after it). `suffix` puts it right before the generation, where a
    Llama-style model attends to it far more than at position 0 (an attention sink).
    """
    if placement == "prefix":
        return control + prompt
    if placement == "suffix":
        return prompt + control
    raise ValueError(f"unknown placement {placement!r}; use 'prefix' or 'suffix'")


def strip_condition(text: str, control: str | None = None) -> str:
    """Remove a control string from the start or end of a prompt; inverse of `condition_prompt`.

    With `control=None`, any quantile token at either end is removed.
    """
    if control is not None:
        if text.startswith(control):
            return text[len(control) :]
        if text.endswith(control):
            return text[: -len(control)]
        return text
    text = re.sub(r"^" + QUANTILE_TOKEN_RE.pattern, "", text)
    return re.sub(QUANTILE_TOKEN_RE.pattern + r"$", "", text)


def control_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of every quantile token in the tokenizer, sorted by quantile index."""
    found = sorted(
        (int(m.group(1)), idx)
        for tok, idx in tokenizer.get_added_vocab().items()
        if (m := QUANTILE_TOKEN_RE.fullmatch(tok))
    )
    return [idx for _, idx in found]


def has_control_tokens(tokenizer: PreTrainedTokenizerBase) -> bool:
    return quantile_token(0) in tokenizer.get_added_vocab()


def add_control_tokens(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    num_quantiles: int,
    *,
    seed: int = 0,
) -> list[int]:
    """Add `_QUANTILE_TOKEN_0_..K-1_` to tokenizer and model; return their ids. Idempotent.

    New input rows are drawn from N(mean_d, std_d) of the existing rows, per dimension (reference
    spec section 2.1). With untied embeddings the output rows are set the same way from the
    output matrix (and a head bias to the mean bias) rather than left to library defaults
    (pitfall 11). The embedding never shrinks: GPT-J's matrix (50,400) is larger than its
    original BPE vocabulary.
    """
    tokens = quantile_tokens(num_quantiles)
    missing = [t for t in tokens if t not in tokenizer.get_added_vocab()]
    if not missing:
        return [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    old_rows = model.get_input_embeddings().weight.shape[0]
    base_rows = min(old_rows, len(tokenizer))  # rows that belong to real tokens
    tokenizer.add_tokens(missing, special_tokens=True)
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in missing]
    if max(new_ids) >= old_rows:
        model.resize_token_embeddings(max(old_rows, len(tokenizer)), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _init_rows(model.get_input_embeddings().weight, base_rows, new_ids, generator)
        output = model.get_output_embeddings()
        tied = output is None or output.weight is model.get_input_embeddings().weight
        if not tied:
            _init_rows(output.weight, base_rows, new_ids, generator)
            if getattr(output, "bias", None) is not None:
                output.bias[new_ids] = output.bias[:base_rows].mean()
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _init_rows(
    weight: torch.Tensor, base_rows: int, ids: list[int], generator: torch.Generator
) -> None:
    base = weight[:base_rows].float()
    mean, std = base.mean(dim=0), base.std(dim=0)
    noise = torch.randn((len(ids), weight.shape[1]), generator=generator)
    weight[ids] = (mean + std * noise).to(weight.dtype)
