"""Conditional-LM trainer (Quark, ALT): maximise log p(generation | control, prompt).

Per item the policy sees `condition_prompt(prompt, _QUANTILE_TOKEN_k_)` and the target
`" " + generation` plus EOS unless the generation was cut at the length limit (its finish reason,
not a punctuation heuristic: reference pitfall 8). The reference, when KL is on, sees the bare
prompt and the same target. The math is in `losses.py`; this file only batches and steps.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from alignment.conditioning import (
    Placement,
    condition_prompt,
    control_token_ids,
    quantile_token,
)
from alignment.config import SamplingConfig, TrainConfig
from alignment.losses import quark_loss, token_logprobs
from alignment.pool import TrainItem
from samplers.hf import truncate_middle

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """`[left-padded prompt | right-padded target]`; labels are the target tokens (b, t)."""

    input_ids: Tensor  # (b, p + t)
    attention_mask: Tensor  # (b, p + t)
    position_ids: Tensor  # (b, p + t): counted from the first real token, as generate() does
    labels: Tensor  # (b, t)
    label_mask: Tensor  # (b, t): 1 on real target tokens (the appended EOS included)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, text: str, sampling: SamplingConfig
) -> list[int]:
    """Tokenize and cut a prompt exactly as the sampler does, so training sees what sampling saw."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return truncate_middle(ids, sampling.max_prompt_tokens, sampling.keep_tail_tokens)


def encode_target(
    tokenizer: PreTrainedTokenizerBase, generation: str, add_eos: bool, max_tokens: int
) -> list[int]:
    ids = tokenizer(" " + generation.strip(), add_special_tokens=False)["input_ids"][:max_tokens]
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def collate(prompts: Sequence[list[int]], targets: Sequence[list[int]], pad_id: int) -> Batch:
    p = max(len(x) for x in prompts)
    t = max(max(len(y) for y in targets), 1)
    ids, mask, labels, label_mask = [], [], [], []
    for x, y in zip(prompts, targets, strict=True):
        left, right = p - len(x), t - len(y)
        ids.append([pad_id] * left + x + y + [pad_id] * right)
        mask.append([0] * left + [1] * (len(x) + len(y)) + [0] * right)
        labels.append(y + [pad_id] * right)
        label_mask.append([1] * len(y) + [0] * right)
    attention = torch.tensor(mask)
    return Batch(
        input_ids=torch.tensor(ids),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        labels=torch.tensor(labels),
        label_mask=torch.tensor(label_mask),
    )


def target_logits(model: nn.Module, batch: Batch) -> Tensor:
    """Logits that predict each target token, (b, t, v); only the last t+1 positions computed."""
    device = next(model.parameters()).device
    t = batch.labels.shape[1]
    out = model(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        logits_to_keep=t + 1,
    )
    return out.logits[:, :-1].float()


@torch.no_grad()
def target_logprobs(
    model: nn.Module,
    prompts: Sequence[list[int]],
    targets: Sequence[list[int]],
    pad_id: int,
    batch_size: int,
) -> list[Tensor]:
    """log p(target token | prompt, earlier target tokens) for each pair; one 1-D tensor each."""
    out: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch = collate(
            prompts[start : start + batch_size], targets[start : start + batch_size], pad_id
        )
        logprobs = token_logprobs(target_logits(model, batch), batch.labels.to(model.device))
        for row, n in zip(logprobs.cpu(), batch.label_mask.sum(-1).tolist(), strict=True):
            out.append(row[:n])
    return out


def freeze_bottom_layers(model: PreTrainedModel, unfrozen_ratio: float) -> tuple[int, int]:
    """Freeze the bottom blocks; embeddings, top blocks, final norm and head stay trainable.

    Blocks are found as the model's ModuleList with `num_hidden_layers` entries, which holds
    for GPT-2 (`transformer.h`), GPT-J (`transformer.h`), Llama (`model.layers`) and most causal
    LMs, without naming any architecture. ALT: int(0.3 * 28) = 8 of GPT-J's blocks train.
    """
    num_blocks = model.config.num_hidden_layers
    blocks = next(
        (m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_blocks),
        None,
    )
    if blocks is None:
        raise ValueError(f"cannot find the {num_blocks} transformer blocks of {type(model)}")
    num_frozen = num_blocks - int(unfrozen_ratio * num_blocks)
    for param in model.parameters():
        param.requires_grad_(True)
    for block in list(blocks)[:num_frozen]:
        for param in block.parameters():
            param.requires_grad_(False)
    return num_frozen, num_blocks


class ConditionalTrainer:
    """Trains the policy on drawn pool items; no sampling, no file I/O."""

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: TrainConfig,
        sampling: SamplingConfig,
        placement: Placement,
        accelerator: Accelerator,
        reference: PreTrainedModel | None = None,
    ) -> None:
        if config.kl_coef > 0 and reference is None:
            raise ValueError("train.kl_coef > 0 needs a reference model")
        self.config, self.sampling, self.placement = config, sampling, placement
        self.tokenizer, self.accelerator, self.reference = tokenizer, accelerator, reference
        frozen, total = freeze_bottom_layers(policy, config.unfrozen_layers_ratio)
        log.info("training the top %d of %d blocks plus embeddings and head", total - frozen, total)
        self.policy = accelerator.prepare(policy)
        ids = control_token_ids(tokenizer)
        self.control_ids = torch.tensor(ids) if ids else None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def _build_optimizer(self, total_steps: int) -> None:
        cfg = self.config
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        scheduler = get_linear_schedule_with_warmup(
            optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps
        )
        self.optimizer, self.scheduler = self.accelerator.prepare(optimizer, scheduler)

    def _encode(self, item: TrainItem) -> tuple[list[int], list[int], list[int]]:
        control = quantile_token(item.quantile)
        conditioned = condition_prompt(item.prompt, control, self.placement)
        policy_prompt = encode_prompt(self.tokenizer, conditioned, self.sampling)
        ref_prompt = encode_prompt(self.tokenizer, item.prompt, self.sampling)
        target = encode_target(
            self.tokenizer,
            item.generation,
            item.finish_reason != "length",
            self.sampling.max_new_tokens,
        )
        return policy_prompt, ref_prompt, target

    def train(self, items: Sequence[TrainItem], seed: int, total_iterations: int = 1) -> list[dict]:
        """One iteration: `num_epochs` shuffled passes over `items`; returns per-step stats."""
        cfg = self.config
        encoded = [self._encode(item) for item in items]
        steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
        if self.optimizer is None or cfg.reset_optimizer:
            schedule_iterations = 1 if cfg.reset_optimizer else total_iterations
            self._build_optimizer(steps_per_epoch * cfg.num_epochs * schedule_iterations)
        rng = random.Random(seed)
        torch.manual_seed(seed)  # dropout: a resumed run must train exactly as an unbroken one
        pad = self.tokenizer.pad_token_id
        history: list[dict] = []
        self.policy.train()
        progress = tqdm(total=steps_per_epoch * cfg.num_epochs, desc="training", unit="step")
        for _ in range(cfg.num_epochs):
            order = list(range(len(encoded)))
            rng.shuffle(order)
            for start in range(0, len(order), cfg.batch_size):
                chunk = [encoded[i] for i in order[start : start + cfg.batch_size]]
                history.append(self._step(chunk, pad))
                progress.update()
                progress.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        progress.close()
        self.policy.eval()
        return history

    def _step(self, chunk: list[tuple[list[int], list[int], list[int]]], pad: int) -> dict:
        cfg = self.config
        targets = [target for _, _, target in chunk]
        batch = collate([p for p, _, _ in chunk], targets, pad)
        logits = target_logits(self.policy, batch)
        if cfg.mask_control_logits and self.control_ids is not None:
            # The sampler never emits control tokens, so train the distribution it samples from.
            logits = logits.index_fill(-1, self.control_ids.to(logits.device), float("-inf"))
        ref_logits = None
        if cfg.kl_coef > 0 and self.reference is not None:
            with torch.no_grad():
                ref_logits = target_logits(
                    self.reference, collate([r for _, r, _ in chunk], targets, pad)
                )
        device = logits.device
        loss, stats = quark_loss(
            logits,
            batch.labels.to(device),
            batch.label_mask.to(device),
            entropy_coef=cfg.entropy_coef,
            kl_coef=cfg.kl_coef,
            ref_logits=ref_logits,
            kl_direction=cfg.kl_direction,
            num_added_tokens=logits.shape[-1]
            - (ref_logits.shape[-1] if ref_logits is not None else logits.shape[-1]),
        )
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError("train() builds the optimizer before the first step")
        self.accelerator.backward(loss)
        if cfg.max_grad_norm is not None:
            stats["grad_norm"] = float(
                self.accelerator.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            )
        embeddings = self.policy.get_input_embeddings().weight
        factor = cfg.control_lr_multiplier
        if factor != 1.0 and self.control_ids is not None:
            rows = self.control_ids.to(embeddings.device)
            before = embeddings.detach()[rows].clone()
        self.optimizer.step()
        if factor != 1.0 and self.control_ids is not None:
            # Adam's step size ignores gradient scale, so the rows' step itself is scaled.
            with torch.no_grad():
                embeddings[rows] = before + factor * (embeddings[rows] - before)
        self.scheduler.step()
        self.optimizer.zero_grad()
        stats["lr"] = self.scheduler.get_last_lr()[0]
        return stats
