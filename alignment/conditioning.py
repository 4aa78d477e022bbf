"""How a reward-conditioned policy is told what quality to aim for: the `Conditioning` strategy.

Quark conditions on new control tokens `_QUANTILE_TOKEN_k_` (0 = best); ALT conditions on text
(feedback phrases). Both are a list of control strings indexed by quantile, attached to the raw
prompt at one placement, so one `Conditioning` object serves the sampler prompts, the trainer
inputs, evaluation and `quark-alt generate`. The string a policy sees at training time must be
exactly the one it sees at inference: a stray space or a different position is a different input
to the model, and a conditioned policy then silently behaves like an unconditioned one.
A checkpoint stores its `Conditioning` as JSON, so inference conditions it the way it was trained.
ALT-LMU, ALT-LMC and SteerLM train each item on its own feedback text rather than on a quantile:
their `Conditioning` also holds the `template` that item texts are written into, and its
controls are that template filled with the feedback aimed for (the exemplar first).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.errors import UserError

Placement = Literal["prefix", "suffix"]
ConditioningKind = Literal["tokens", "text"]
CONDITIONING_FILE = "conditioning.json"
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


def tied_embeddings(model: PreTrainedModel) -> bool:
    """Whether the output layer is the input embedding (GPT-2, SmolLM2), not its own (GPT-J)."""
    output = model.get_output_embeddings()
    return output is None or output.weight is model.get_input_embeddings().weight


def add_control_tokens(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    num_quantiles: int,
    *,
    seed: int = 0,
) -> list[int]:
    """Add `_QUANTILE_TOKEN_0_..K-1_` to tokenizer and model; return their ids. Idempotent.

    New input rows are drawn from N(mean_d, std_d) of the existing rows, per dimension, as ALT
    does: a new row then looks like a typical token to the first block instead of an outlier.
    With untied embeddings the output rows are set the same way from the output matrix (and a
    head bias to the mean bias): library defaults would give the new tokens a logit far from the
    others'. The embedding never shrinks: GPT-J's matrix (50,400) is larger than its original
    BPE vocabulary, and shrinking it would drop trained rows.
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
        if not tied_embeddings(model):
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


@dataclass(frozen=True)
class Conditioning:
    """Control strings by quantile (`controls[0]` = best) and where they go in the prompt.

    `kind="tokens"`: the controls are new tokens that `prepare` adds to tokenizer and model
    (Quark). `kind="text"`: the controls are ordinary text and nothing is added (ALT).
    `template` (text only, holding `{feedback}`): training items carry their own feedback
    text, written into it (`condition(prompt, feedback=...)`); the controls are what sampling
    and evaluation use, filled in the same way.
    """

    kind: ConditioningKind
    controls: tuple[str, ...]
    placement: Placement = "prefix"
    template: str | None = None

    def __post_init__(self) -> None:
        if not self.controls:
            raise ValueError("a conditioning needs at least one control string")
        if self.placement not in ("prefix", "suffix"):
            raise ValueError(f"unknown placement {self.placement!r}; use 'prefix' or 'suffix'")
        if self.template is not None and (self.kind != "text" or "{feedback}" not in self.template):
            raise ValueError("a conditioning template is text holding '{feedback}'")

    @classmethod
    def feedback_texts(
        cls, template: str, texts: tuple[str, ...], placement: Placement = "prefix"
    ) -> Conditioning:
        """Per-item text conditioning; `texts` are the feedback to sample with, best first."""
        controls = tuple(template.format(feedback=t) for t in texts)
        return cls("text", controls, placement, template)

    @classmethod
    def quantile_tokens(cls, num_quantiles: int, placement: Placement = "prefix") -> Conditioning:
        return cls("tokens", tuple(quantile_tokens(num_quantiles)), placement)

    @property
    def best(self) -> str:
        return self.controls[0]

    def condition(self, prompt: str, quantile: int = 0, feedback: str | None = None) -> str:
        """The raw prompt conditioned on quantile `quantile` (default: the best), or on the
        item's own `feedback` text when there is a template."""
        if feedback is not None:
            if self.template is None:
                raise ValueError("this conditioning is keyed by quantile: it has no template")
            return condition_prompt(prompt, self.template.format(feedback=feedback), self.placement)
        if not 0 <= quantile < len(self.controls):
            raise ValueError(f"quantile {quantile} outside [0, {len(self.controls)})")
        return condition_prompt(prompt, self.controls[quantile], self.placement)

    def prepare(
        self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, seed: int
    ) -> None:
        """Make the model able to read the controls: add the tokens (Quark); text needs nothing."""
        if self.kind == "tokens":
            add_control_tokens(tokenizer, model, len(self.controls), seed=seed)

    def is_ready(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether `tokenizer` can express every control as trained (tokens added)."""
        return self.kind == "text" or all(c in tokenizer.get_added_vocab() for c in self.controls)

    def save(self, folder: str | Path) -> None:
        """Write `conditioning.json` into a checkpoint folder (not atomic: the folder is)."""
        data = {**asdict(self), "controls": list(self.controls)}
        (Path(folder) / CONDITIONING_FILE).write_text(json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path, tokenizer: PreTrainedTokenizerBase) -> Conditioning | None:
        """The conditioning a checkpoint was trained with; None for an unconditioned policy.

        Saved control tokens the tokenizer lacks are an error. A folder without
        `conditioning.json` whose tokenizer has quantile tokens (a checkpoint of
        an older version, or one made by ALT's code) is read as tokens at the prefix, ALT's layout.
        """
        path = Path(folder) / CONDITIONING_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                saved = cls(
                    data["kind"], tuple(data["controls"]), data["placement"], data.get("template")
                )
            except (ValueError, KeyError, TypeError) as err:
                raise UserError(f"{path}: not a valid conditioning file ({err})") from err
            if not saved.is_ready(tokenizer):  # the controls would be split into sub-words
                missing = [c for c in saved.controls if c not in tokenizer.get_added_vocab()]
                raise UserError(
                    f"{folder}: conditioning.json says it is conditioned on control tokens, but "
                    f"its tokenizer lacks {', '.join(missing)}"
                )
            return saved
        ids = control_token_ids(tokenizer)
        return cls.quantile_tokens(len(ids)) if ids else None
