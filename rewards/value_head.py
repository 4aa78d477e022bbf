"""Value-head reward models in the CarperAI layout: the TL;DR GPT-J reward model of the paper.

The checkpoint is one state dict: `transformer.*` (a causal-LM backbone without its LM head) and
`v_head.weight` (a bias-free Linear(hidden, 1) applied to the final hidden states). The backbone
name only supplies the architecture config and the tokenizer; all weights come from the file.
Reference behaviour: `docs/algorithm.md` section 8. Unlike ALT, a too-long input loses post tokens,
never summary tokens (`docs/algorithm.md` section 15 item 8).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from alignment.errors import UserError
from alignment.models import default_device, load_tokenizer, resolve_model_path, torch_dtype
from rewards.base import RewardBase, Scores, check_pairs, pad_batch, score_by_length
from rewards.functions import TLDR_MARKER, split_tldr

# Keys a CarperAI checkpoint may carry that the model does not need: the LM head of the SFT
# model it started from, and causal-mask buffers that older transformers saved with GPT-J.
_IGNORED_KEYS = re.compile(r"^lm_head\.|\.attn\.(masked_)?bias$")


class ValueHeadModel(nn.Module):
    """Backbone + bias-free scalar head: one value per position, shape (b, t)."""

    def __init__(self, transformer: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.transformer = transformer
        self.v_head = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        return self.v_head(hidden.last_hidden_state).squeeze(-1)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from `.safetensors`, or from a `.bin`/`.pt` pickle loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such state-dict file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path}: refused to unpickle (weights_only=True allows only tensors and plain "
            "containers); re-save it as a plain state dict or as .safetensors"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise UserError(f"{path}: not a readable torch state dict ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def build_value_head_model(
    backbone: str, weights: str | Path, *, dtype: str, device: str, trust_remote_code: bool
) -> ValueHeadModel:
    """Build the architecture from `backbone`'s config and load every weight from `weights`."""
    torch_dtype(dtype)
    state = load_state_dict_file(weights)
    try:
        config = AutoConfig.from_pretrained(
            resolve_model_path(backbone), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the config of backbone {backbone!r}: {err}") from err
    # Random init directly on the target device is cheap next to moving 6B weights twice.
    with torch.device(device):
        transformer = AutoModel.from_config(
            config, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
        model = ValueHeadModel(transformer, config.hidden_size).to(torch_dtype(dtype))
    expected = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in expected or not _IGNORED_KEYS.search(k)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(
            f"{weights}: does not fit a {config.model_type} value-head model "
            f"(transformer.* + v_head.weight): {_listing('missing', missing)}; "
            f"{_listing('unexpected', unexpected)}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(f"{weights}: {str(err).splitlines()[-1].strip()}") from err
    return model.eval()


def _listing(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
    return f"{label} keys: {shown or 'none'}"


class ValueHeadReward(RewardBase):
    """Reward = v_head output at the last summary token of the CarperAI TL;DR input text.

    Text: `{start_text}{post part}\\nTL;DR: {summary}{eos}` (the start marker is literal text,
    BPE-split as in training), right-padded. The summary part is tokenized first and kept whole;
    the post part gets the remaining `max_length` budget, so a long post can never push the
    summary out (the reference truncates on the right and then scores a post token).

    Args:
        backbone: hub id or folder with the architecture config (e.g.
            CarperAI/openai_summarize_tldr_sft) and, unless `tokenizer` is given, the tokenizer.
        weights: the state-dict file (`.safetensors`, or `.bin` loaded weights-only).
        tokenizer: tokenizer name or folder (EleutherAI/gpt-j-6b for the CarperAI model).
        max_length: tokens per input, 550 as in RM training and ALT inference.
    """

    def __init__(
        self,
        backbone: str,
        weights: str,
        *,
        tokenizer: str | None = None,
        max_length: int = 550,
        start_text: str = "<|startoftext|>",
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> None:
        if batch_size < 1 or max_length < 8:
            raise UserError("value-head reward needs batch_size >= 1 and max_length >= 8")
        self.name = f"value-head:{backbone}:{weights}"
        self.max_length, self.start_text, self.batch_size = max_length, start_text, batch_size
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(
            tokenizer or backbone, trust_remote_code=trust_remote_code, padding_side="right"
        )
        if self.tokenizer.eos_token_id is None:
            raise UserError(f"tokenizer of {tokenizer or backbone!r} has no end-of-text token")
        self.model = build_value_head_model(
            backbone, weights, dtype=dtype, device=self.device, trust_remote_code=trust_remote_code
        )

    def encode(self, prompt: str, completion: str) -> tuple[list[int], int]:
        """Token ids of one input and the position whose value is the score."""
        post, summary = split_tldr(prompt, completion)
        eos = self.tokenizer.eos_token_id
        summary_ids = self._ids(f"\n{TLDR_MARKER} {summary}") + [eos]
        if len(summary_ids) > self.max_length - 1:  # only a summary longer than the whole budget
            summary_ids = summary_ids[: self.max_length - 2] + [eos]
        post_ids = self._ids(self.start_text + post)[: self.max_length - len(summary_ids)]
        # The first end-of-text in the summary part ends the summary, as in the reference.
        return post_ids + summary_ids, len(post_ids) + summary_ids.index(eos) - 1

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Scores:
        check_pairs(prompts, completions)
        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]

        def score_batch(indices: list[int]) -> list[float]:
            batch = pad_batch(
                [{"input_ids": encoded[i][0]} for i in indices],
                self.tokenizer,
                self.device,
            )
            with torch.inference_mode():
                values = self.model(batch["input_ids"], batch["attention_mask"]).float()
            positions = torch.tensor([encoded[i][1] for i in indices], device=values.device)
            return values[torch.arange(len(indices), device=values.device), positions].tolist()

        lengths = [len(ids) for ids, _ in encoded]
        return score_by_length(lengths, self.batch_size, score_batch, self.sort_by_length)
