"""Seq2seq models read as verbalisers: a reward from what an encoder-decoder says about a text.

One backend covers the two ways such models are used as scorers:

- **label words** (Kaleido): the text is written into the model's input template and the score is
  a weighted sum of the probabilities the *first decoder step* gives to label words, e.g.
  P(`Supports`) - P(`Opposes`) for Kaleido's valence;
- **target likelihood** (FLIPPED): the score is the mean log-likelihood per token of a fixed
  target text (an instruction) given the input, e.g. `input: {prompt}\\noutput: {completion}`.

`kaleido:` and `flipped:` are presets of the generic `seq2seq:` backend (see `rewards/__init__.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from alignment.errors import UserError
from alignment.models import (
    default_device,
    load_config,
    load_model_and_tokenizer,
    quantization_config,
)
from rewards.base import RewardBase, Scores, check_pairs, pad_batch, score_by_length

log = logging.getLogger(__name__)

# Kaleido's input layout when the checkpoint's config does not carry its own templates: the
# published checkpoints keep them in `task_specific_params`; ACTION, VRD and TEXT are filled in.
KALEIDO_TEMPLATES: dict[str, str] = {
    "valence": "[Valence]:\tAction: ACTION\tVRD: TEXT",
    "relevance": "[Relevance]:\tAction: ACTION\tVRD: TEXT",
}
# What each task's first decoder step is read as: the words the authors' own scorer reads (the
# KaleidoSys class the model's authors publish with it: `Yes`/`No` for relevance;
# `Supports`/`Opposes`, and `Either`, for valence). That scorer differs in two ways: it
# renormalises the softmax over the task's words (here it runs over the whole vocabulary, see
# `label_score`), and it reads the logits after two pad tokens as decoder input, where this
# reads the first decoder step. Which step the released checkpoints answer at could not be
# checked without them (no hub access).
KALEIDO_LABELS: dict[str, dict[str, float]] = {
    "valence": {"Supports": 1.0, "Opposes": -1.0},
    "relevance": {"Yes": 1.0, "No": -1.0},
}
FLIPPED_TEMPLATE = "input: {prompt}\noutput: {completion}"


def label_score(first_logits: Tensor, label_ids: Sequence[int], weights: Sequence[float]) -> Tensor:
    """sum_k weights[k] * softmax(first_logits)[label_ids[k]], one value per row.

    The softmax runs over the whole vocabulary, so probability the model puts on other words
    (Kaleido's `Either`) counts for nothing rather than being renormalised away.
    """
    probs = first_logits.float().softmax(dim=-1)[:, list(label_ids)]
    return probs @ torch.tensor(list(weights), dtype=probs.dtype, device=probs.device)


def mean_target_loglik(logits: Tensor, target_ids: Tensor, target_mask: Tensor) -> Tensor:
    """Mean log-probability per real target token: (b, t, v) logits, (b, t) ids and 0/1 mask."""
    logprobs = logits.float().log_softmax(dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    mask = target_mask.to(logprobs.dtype)
    return (logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def parse_labels(labels: str | Mapping[str, float]) -> dict[str, float]:
    """`Supports=1,Opposes=-1` (how a config or CLI option writes it) or a mapping, as a dict."""
    if isinstance(labels, Mapping):
        parsed = {str(k): float(v) for k, v in labels.items()}
    else:
        parsed = {}
        for part in labels.split(","):
            word, sep, weight = part.partition("=")
            try:
                parsed[word.strip()] = float(weight) if sep else 1.0
            except ValueError:
                raise UserError(f"labels: {part!r} must look like WORD=WEIGHT") from None
    if not parsed or any(not word for word in parsed):
        raise UserError(f"labels: need at least one WORD=WEIGHT, got {labels!r}")
    return parsed


class Seq2SeqReward(RewardBase):
    """Reward from an AutoModelForSeq2SeqLM: label-word probabilities or a target's likelihood.

    Args:
        model: hub id or local folder of an encoder-decoder (T5, BART, ...).
        template: the encoder input, with `{prompt}` and/or `{completion}` (both stripped).
        labels: label mode: `WORD=WEIGHT,...`; the score is sum of weight x P(first token of WORD)
            at the first decoder step.
        target: likelihood mode: the text whose mean per-token log-likelihood is the score.
        max_length: encoder tokens; longer inputs lose their start (the completion sits last in
            every template here, so what is judged is kept).
        quantization: `8bit` or `4bit` to load the model through bitsandbytes (CUDA or CPU).
    """

    def __init__(
        self,
        model: str,
        *,
        template: str,
        labels: str | Mapping[str, float] | None = None,
        target: str | None = None,
        max_length: int = 512,
        batch_size: int = 16,
        device: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        quantization: str | None = None,
    ) -> None:
        if (labels is None) == (target is None):
            raise UserError(f"reward {model}: give exactly one of labels (Kaleido) or target")
        if "{prompt}" not in template and "{completion}" not in template:
            raise UserError(f"template {template!r} must contain {{prompt}} or {{completion}}")
        if batch_size < 1 or max_length < 1:
            raise UserError("batch_size and max_length must be >= 1")
        self.name, self.template = model, template
        self.batch_size, self.max_length = batch_size, max_length
        self.device = device or default_device()
        self.model, self.tokenizer = load_model_and_tokenizer(
            model,
            head="seq2seq-lm",
            dtype=dtype,
            device=self.device,
            trust_remote_code=trust_remote_code,
            padding_side="right",
            quantization=quantization_config(quantization, "reward quantization"),
        )
        self.tokenizer.truncation_side = "left"
        self.label_ids: list[int] = []
        self.weights: list[float] = []
        if labels is not None:
            for word, weight in parse_labels(labels).items():
                self.label_ids.append(self._first_token(word))
                self.weights.append(weight)
            if len(set(self.label_ids)) != len(self.label_ids):
                raise UserError(f"reward {model}: label words {labels!r} share a first token")
        self.target = target

    def _first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if not ids or ids[0] == self.tokenizer.unk_token_id:
            raise UserError(f"reward {self.name}: label word {word!r} is not in its vocabulary")
        return ids[0]

    def render(self, prompt: str, completion: str) -> str:
        return self.template.format(prompt=prompt.strip(), completion=completion.strip())

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> Scores:
        check_pairs(prompts, completions)
        texts = [self.render(p, c) for p, c in zip(prompts, completions, strict=True)]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        items = [{k: encoded[k][i] for k in encoded} for i in range(len(texts))]
        target = (
            self.tokenizer(self.target, return_tensors="pt").input_ids.to(self.device)
            if self.target is not None
            else None
        )

        def score_batch(indices: list[int]) -> list[float]:
            batch = pad_batch([items[i] for i in indices], self.tokenizer, self.device)
            with torch.inference_mode():
                if target is None:
                    start = self._decoder_start(len(indices))
                    logits = self.model(**batch, decoder_input_ids=start).logits
                    return label_score(logits[:, 0], self.label_ids, self.weights).tolist()
                labels = target.expand(len(indices), -1)
                logits = self.model(**batch, labels=labels).logits
                return mean_target_loglik(logits, labels, torch.ones_like(labels)).tolist()

        lengths = [len(item["input_ids"]) for item in items]
        return score_by_length(lengths, self.batch_size, score_batch, self.sort_by_length)

    def _decoder_start(self, rows: int) -> Tensor:
        start = self.model.config.decoder_start_token_id
        if start is None:
            raise UserError(f"reward {self.name}: the model config has no decoder_start_token_id")
        return torch.full((rows, 1), start, dtype=torch.long, device=self.device)


def kaleido_template(task_params: object, task: str, vrd: str, text: str) -> str:
    """Kaleido's encoder input for `task`, the completion as ACTION (`{completion}`).

    The checkpoint's `task_specific_params[task]` (a string, or a mapping with a `template`)
    wins; otherwise the published layout in KALEIDO_TEMPLATES is used, and the log says so.
    """
    found = task_params.get(task) if isinstance(task_params, Mapping) else None
    if isinstance(found, Mapping):
        found = found.get("template")
    if not isinstance(found, str) or "ACTION" not in found:
        log.info(
            "kaleido: no %s template in the model config; using %r", task, KALEIDO_TEMPLATES[task]
        )
        found = KALEIDO_TEMPLATES[task]

    def escaped(part: str) -> str:  # literal braces must survive the later .format
        return part.replace("{", "{{").replace("}", "}}")

    return (
        escaped(found)
        .replace("ACTION", "{completion}")
        .replace("VRD", escaped(vrd))
        .replace("TEXT", escaped(text))
    )


def kaleido_options(
    model: str,
    value: str,
    vrd: str = "Value",
    task: str = "valence",
    labels: str | Mapping[str, float] | None = None,
) -> dict[str, object]:
    """Seq2SeqReward's template and labels for Kaleido: how strongly a generation supports
    `value` (valence: P(Supports) - P(Opposes)) or bears on it (relevance).

    `value` is Kaleido's TEXT (e.g. `Honesty`), `vrd` one of Value / Right / Duty, `labels`
    overrides the task's label words.
    """
    if vrd not in ("Value", "Right", "Duty"):
        raise UserError(f"kaleido: vrd must be Value, Right or Duty, got {vrd!r}")
    if task not in KALEIDO_TEMPLATES:
        raise UserError(f"kaleido: task must be one of {sorted(KALEIDO_TEMPLATES)}, got {task!r}")
    params = getattr(load_config(model), "task_specific_params", None)
    return {
        "template": kaleido_template(params, task, vrd, value),  # type: ignore[arg-type]
        "labels": labels if labels is not None else KALEIDO_LABELS[task],
    }
