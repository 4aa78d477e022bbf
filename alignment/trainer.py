"""Conditional-LM trainer (Quark, ALT, RFT): maximise log p(generation | control, prompt).

Per item the policy sees the prompt conditioned on the item's quantile (or the bare prompt when
there is no conditioning, as in RFT) and the target `" " + generation`, plus EOS unless the
generation was cut at the length limit. The finish reason decides, not a punctuation heuristic:
teaching EOS after a cut-off text teaches the model to stop mid-sentence. The reference, when KL
is on, sees the bare prompt and the same target. The math is in `losses.py`; this file batches,
steps, and keeps one optimizer for the whole run.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from accelerate import Accelerator
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.adapters import control_rows, save_control_rows
from alignment.conditioning import Conditioning, control_token_ids, tied_embeddings
from alignment.config import LoraConfig, SamplingConfig, TrainConfig
from alignment.errors import UserError
from alignment.losses import quark_loss, token_logprobs
from alignment.pool import TrainItem
from alignment.prefix_sharing import prompt_grouped_batches, shared_prefix_target_logits
from alignment.prompts import truncate_middle
from alignment.sharding import deepspeed_settings, local_rows, shards_weights, zero_stage

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def ban_tokens(logits: Tensor, ids: Sequence[int] | Tensor) -> Tensor:
    """`logits` with `ids` at -inf: the distribution of a sampler that never emits them (the
    control tokens), renormalized over the rest."""
    return logits.index_fill(-1, torch.as_tensor(ids, device=logits.device), -math.inf)


@torch.no_grad()
def target_logprobs(
    model: nn.Module,
    prompts: Sequence[list[int]],
    targets: Sequence[list[int]],
    pad_id: int,
    batch_size: int,
    banned: Sequence[int] = (),
) -> list[Tensor]:
    """log p(target token | prompt, earlier target tokens) for each pair; one 1-D tensor each.

    Pairs that share a prompt (K samples of one prompt, in a row) run it once per batch
    (`shared_prefix_target_logits`): evaluation scores every sample under two models, and
    teacher-forcing each sample's whole prompt cost more than sampling them did. `banned` tokens
    get probability 0, the rest renormalized: the distribution of a sampler that never emits them.
    """
    out: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        logits, batch = shared_prefix_target_logits(
            model, prompts[start:end], targets[start:end], pad_id
        )
        if banned:
            logits = ban_tokens(logits, banned)
        logprobs = token_logprobs(logits, batch.labels.to(model.device))
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


def lora_config(
    model: PreTrainedModel, lora: LoraConfig, control_ids: list[int], mask_control_logits: bool
) -> PeftLoraConfig:
    """peft's LoRA settings, with the control tokens' embedding rows trainable.

    peft's `trainable_token_indices` trains just those rows of the input embedding, and with
    tied embeddings (GPT-2, SmolLM2) the output rows with them. With untied ones (GPT-J) the
    output rows would need their own entry, but they matter only when `mask_control_logits` is
    off: masked, their logits are -inf in training and never sampled, so their gradient is 0.
    Unmasked, they train too, except under a head with a bias (GPT-J): peft 0.21 computes a
    wrapped head as `F.linear` without the bias, which would change every logit.
    """
    targets: dict[str, list[int]] = {}
    if control_ids:
        modules = {id(m): name for name, m in model.named_modules()}
        targets[modules[id(model.get_input_embeddings())]] = control_ids
        output = model.get_output_embeddings()
        if not tied_embeddings(model) and not mask_control_logits:
            if getattr(output, "bias", None) is not None:
                raise UserError(
                    "train.lora with train.mask_control_logits=false cannot train the control "
                    f"tokens' output rows of {type(model).__name__}: its output layer has a bias, "
                    "which peft drops; keep train.mask_control_logits=true"
                )
            targets[modules[id(output)]] = control_ids
    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        trainable_token_indices=targets or None,
        task_type="CAUSAL_LM",
    )


@dataclass
class WarmupLinearDecay:
    """transformers' linear schedule with warm-up as a restartable LambdaLR factor.

    A fresh schedule per iteration (ALT's reset) used to mean a fresh optimizer and scheduler per
    iteration, and accelerate keeps every prepared optimizer alive: +0.45 GiB per iteration on
    SmolLM2, ~14 GB on GPT-J. One scheduler whose factor restarts at `start` avoids that. Being a
    callable object, its fields are saved in the scheduler's state_dict, so a resumed run
    continues the same schedule.
    """

    warmup: int = 0
    total: int = 0  # 0 = not started yet
    start: int = 0

    def __call__(self, step: int) -> float:
        step -= self.start
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))


def shard_slice(n: int, rank: int, num_processes: int) -> slice:
    """Rank `rank`'s contiguous share of n items, split as `split_between_processes` splits a
    list (the first n % num_processes ranks take one more), so that the shares, concatenated in
    rank order (as `gather_object` returns them), are the n items in order."""
    size, extra = divmod(n, num_processes)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def shard_loss_weight(local_tokens: int, global_tokens: int, num_processes: int) -> float:
    """The factor on a rank's token-mean loss that makes DDP's gradient the global batch's.

    DDP averages the ranks' gradients, i.e. computes (1/N) sum_r grad(w_r * mean_r). With
    w_r = N * n_r / n (n_r: the rank's target tokens, n: the batch's) that is
    grad(sum_r n_r * mean_r / n) = grad(token mean over the whole batch): the one-process loss,
    whatever the shards' token counts. Unweighted (w_r = 1) a rank of short targets would count
    as much as one of long targets. E.g. 30 and 10 tokens on 2 ranks: weights 1.5 and 0.5.
    """
    return num_processes * local_tokens / global_tokens


def rank_share(
    accelerator: Accelerator, batch: list[T], tokens: Callable[[T], int]
) -> tuple[list[T], float, int, int]:
    """This rank's share of a global `batch` (all of it on one process), the weight on its
    token-mean loss (`shard_loss_weight`), its token count and the batch's.

    A rank left with no item still has to run forward and backward (DDP waits for its
    gradients): it gets the batch's first item, with weight 0."""
    with accelerator.split_between_processes(batch) as share:
        local_tokens = sum(tokens(item) for item in share)
        share = share or batch[:1]
    device = accelerator.device
    global_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=device), "sum"))
    weight = shard_loss_weight(local_tokens, global_tokens, accelerator.num_processes)
    return share, weight, local_tokens, global_tokens


def global_token_means(
    accelerator: Accelerator,
    stats: dict,
    keys: list[str],
    local_tokens: int,
    global_tokens: int,
) -> dict:
    """`stats` with each of `keys` (a token mean over this rank's share of a step's batch) made
    the mean over the whole batch, and "tokens" its token count; as they are on one process."""
    if accelerator.num_processes == 1:
        return stats
    keys = [k for k in keys if k in stats]
    local = torch.tensor([stats[k] * local_tokens for k in keys], device=accelerator.device)
    summed = accelerator.reduce(local, "sum").tolist()
    return {
        **stats,
        **{k: v / global_tokens for k, v in zip(keys, summed, strict=True)},
        "tokens": float(global_tokens),
    }


class ConditionalTrainer:
    """Trains the policy on drawn pool items; no sampling, no file I/O but its own state (and
    its last LoRA adapter, with `train.lora.checkpoint=adapter`).

    One AdamW and one scheduler live for the whole run; `reset_optimizer` clears the optimizer's
    moments and restarts the schedule instead of building new ones.

    On several processes `train.batch_size` stays the global batch: every rank shuffles the same
    way (the same seed) and runs its contiguous part of each batch, the DDP-prepared policy
    averages the gradients, and `shard_loss_weight` makes that average the one-process gradient
    of the batch. The number of processes thus changes neither the steps nor (without dropout,
    up to float summation order) the weights.
    """

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: TrainConfig,
        sampling: SamplingConfig,
        conditioning: Conditioning | None,
        accelerator: Accelerator,
        reference: PreTrainedModel | None = None,
    ) -> None:
        if config.kl_coef > 0 and reference is None:
            raise ValueError("train.kl_coef > 0 needs a reference model")
        self.config, self.sampling, self.conditioning = config, sampling, conditioning
        self.tokenizer, self.accelerator, self.reference = tokenizer, accelerator, reference
        ids = control_token_ids(tokenizer)
        self.control_ids = torch.tensor(ids) if ids else None
        if config.lora is None:
            frozen, total = freeze_bottom_layers(policy, config.unfrozen_layers_ratio)
            log.info("training the top %d of %d blocks, embeddings and head", total - frozen, total)
            self._prepare(policy, [p for p in policy.parameters() if p.requires_grad])
        else:
            self.policy = policy  # `train` adds a fresh adapter each iteration and merges it
            self._lora = lora_config(policy, config.lora, ids, config.mask_control_logits)
        # train.lora.checkpoint=adapter: the last adapter as peft saved it before its merge, and
        # the control rows of the weights it was trained on (`save_adapter`)
        self._adapter: tempfile.TemporaryDirectory | None = None
        self._base_rows: dict[str, Tensor] | None = None
        # The weights are saved as a checkpoint by the loop (save_pretrained); the training
        # state next to them holds only what the checkpoint lacks. (Not under FSDP or DeepSpeed:
        # accelerate saves their prepared model outside these hooks, a copy of the weights.)
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())

    def _prepare(self, policy: nn.Module, params: list[dict] | list[nn.Parameter]) -> None:
        """One AdamW over `params` and its restartable schedule, prepared with `policy`."""
        cfg = self.config
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.schedule = WarmupLinearDecay()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule)
        acc = self.accelerator
        if zero_stage(acc) is not None:
            plugin = acc.state.deepspeed_plugin
            micro_batch = math.ceil(cfg.batch_size / acc.num_processes)
            # in place: accelerate reads the same dict through the plugin's `hf_ds_config` too
            plugin.deepspeed_config.update(
                deepspeed_settings(
                    plugin.deepspeed_config, micro_batch, acc.num_processes, cfg.max_grad_norm
                )
            )
        self.policy, self.optimizer, self.scheduler = self.accelerator.prepare(
            policy, optimizer, scheduler
        )
        # Each global batch is split across the ranks (accelerate's `split_batches`), so one
        # optimizer step is one schedule step; by default accelerate steps it once per rank.
        self.scheduler.split_batches = True
        self._raw_scheduler = scheduler

    def _add_adapter(self) -> None:
        """Wrap the policy in a fresh LoRA adapter; the control rows' step scaled by a param group.

        Scaling a group's learning rate scales its whole AdamW step, which is what the full
        fine-tuning path does to the rows by hand (peft keeps them in their own tensor here).
        """
        if self.config.lora.checkpoint == "adapter" and self.control_ids is not None:
            self._base_rows = control_rows(self.policy, self.control_ids.tolist())
        model = get_peft_model(self.policy, self._lora)
        trainable, total = model.get_nb_trainable_parameters()
        log.info("training a LoRA adapter: %d of %d parameters", trainable, total)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        rows = [p for n, p in named if "trainable_tokens_delta" in n]
        groups = [{"params": [p for n, p in named if "trainable_tokens_delta" not in n]}]
        if rows:
            lr = self.config.learning_rate * self.config.control_lr_multiplier
            groups.append({"params": rows, "lr": lr})
        self._prepare(model, groups)

    def _merge_adapter(self) -> None:
        """Merge the adapter into the policy's weights: the loop's model object, now plain again.

        accelerate keeps every prepared model and optimizer; releasing them keeps a run's memory
        flat and its saved training state free of the adapters of finished iterations.
        """
        peft_model = self.accelerator.unwrap_model(self.policy)
        if self.config.lora.checkpoint == "adapter" and self.accelerator.is_main_process:
            if self._adapter is not None:
                self._adapter.cleanup()
            self._adapter = tempfile.TemporaryDirectory(prefix="quark-alt-adapter-")
            # save_embedding_layers=False: peft would otherwise save both whole embedding
            # matrices of a resized model (GPT-J: ~0.8 GB), and ask the hub for the base's config
            peft_model.save_pretrained(self._adapter.name, save_embedding_layers=False)
        self.policy = peft_model.merge_and_unload()
        self.accelerator.free_memory()

    def save_adapter(self, folder: Path) -> None:
        """The last iteration's adapter (peft's files) and, with control tokens, the control rows
        of the weights it was trained on (`alignment.adapters`), into a checkpoint folder."""
        if self._adapter is None:
            raise RuntimeError("no adapter to save: save_adapter follows train on the main process")
        for file in Path(self._adapter.name).iterdir():
            if file.name != "README.md":  # peft's model card; the checkpoint has its own
                shutil.copy2(file, folder / file.name)
        if self._base_rows is not None:
            save_control_rows(self._base_rows, folder)

    def save_state(self, folder: str | Path) -> None:
        """Optimizer, scheduler and RNG state, through accelerate, into `folder`."""
        self.accelerator.save_state(str(folder), safe_serialization=True)

    def load_state(self, folder: str | Path) -> None:
        self.accelerator.load_state(str(folder))

    def _restart_schedule(self, total_steps: int) -> None:
        """Warm-up and linear decay over the next `total_steps` steps, from the current step."""
        cfg, scheduler = self.config, self._raw_scheduler
        if cfg.reset_optimizer:
            # AdamW's moments and step counts: a fresh AdamW. Through the prepared optimizer, as
            # the groups below: DeepSpeed's steps its fp32 copies (with offload, as its CPU Adam)
            self.optimizer.state.clear()
        self.schedule.start = scheduler.last_epoch
        self.schedule.warmup = math.ceil(cfg.warmup_ratio * total_steps)
        self.schedule.total = total_steps
        factor = self.schedule(scheduler.last_epoch)
        # the prepared optimizer's groups: under DeepSpeed's offload they are its CPU Adam's
        groups = self.optimizer.param_groups
        for group, base in zip(groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * factor
        scheduler._last_lr = [group["lr"] for group in groups]

    def _encode(self, item: TrainItem) -> tuple[list[int], list[int], list[int]]:
        conditioned = (
            self.conditioning.condition(item.prompt, item.quantile, item.feedback)
            if self.conditioning is not None
            else item.prompt
        )
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
        """One iteration: `num_epochs` shuffled passes over `items`; returns per-step stats.

        With `reset_optimizer` the schedule spans this call; without it, the first call starts
        one schedule over `total_iterations` calls of the same size.
        """
        cfg = self.config
        # dropout and a new adapter: a resumed run must train exactly as an unbroken one
        torch.manual_seed(seed)
        if cfg.lora is not None:
            self._add_adapter()
        encoded = [self._encode(item) for item in items]
        steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
        if self.schedule.total == 0 or cfg.reset_optimizer:
            iterations = 1 if cfg.reset_optimizer else total_iterations
            self._restart_schedule(steps_per_epoch * cfg.num_epochs * iterations)
        rng = random.Random(seed)
        pad = self.tokenizer.pad_token_id
        history: list[dict] = []
        self.policy.train()
        progress = tqdm(
            total=steps_per_epoch * cfg.num_epochs,
            desc="training",
            unit="step",
            disable=not self.accelerator.is_local_main_process,
        )
        for _ in range(cfg.num_epochs):
            if cfg.batches_by_prompt:
                batches = prompt_grouped_batches([i.prompt for i in items], cfg.batch_size, rng)
            else:
                order = list(range(len(encoded)))
                rng.shuffle(order)
                batches = [
                    order[start : start + cfg.batch_size]
                    for start in range(0, len(order), cfg.batch_size)
                ]
            for batch in batches:
                history.append(self._step([encoded[i] for i in batch], pad))
                progress.update()
                progress.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        progress.close()
        self.policy.eval()
        if cfg.lora is not None:
            self._merge_adapter()
        return history

    def _step(self, batch: list[tuple[list[int], list[int], list[int]]], pad: int) -> dict:
        """One optimizer step on the global `batch`, of which this rank runs its share."""
        cfg, acc = self.config, self.accelerator
        chunk, weight, local_tokens, global_tokens = rank_share(
            acc, batch, lambda item: len(item[2])
        )
        targets = [target for _, _, target in chunk]
        prompts = [p for p, _, _ in chunk]
        if shards_weights(self.policy, acc):
            # One forward per step on every rank: each all-gathers the weights, a collective
            # that all ranks must join equally often, and prefix sharing runs one or two.
            batch = collate(prompts, targets, pad)
            logits = target_logits(self.policy, batch)
        else:
            # Items whose prompts share a prefix run it once (the same logits as `collate` +
            # `target_logits`, a fraction of the compute when a batch holds several of a prompt).
            logits, batch = shared_prefix_target_logits(self.policy, prompts, targets, pad)
        if cfg.mask_control_logits and self.control_ids is not None:
            # The sampler never emits control tokens, so train the distribution it samples from.
            logits = ban_tokens(logits, self.control_ids)
        ref_logits = None
        if cfg.kl_coef > 0 and self.reference is not None:
            with torch.no_grad():
                ref_logits, _ = shared_prefix_target_logits(
                    self.reference, [r for _, r, _ in chunk], targets, pad
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
        self.accelerator.backward(loss * weight)
        keys = ["loss", "nll", "entropy", "kl"]
        stats = global_token_means(acc, stats, keys, local_tokens, global_tokens)
        if cfg.max_grad_norm is not None:
            stats["grad_norm"] = float(
                self.accelerator.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            )
        factor = cfg.control_lr_multiplier
        scale_rows = factor != 1.0 and self.control_ids is not None and cfg.lora is None
        if scale_rows:  # with LoRA, the rows' param group has its own learning rate
            embeddings = acc.unwrap_model(self.policy).get_input_embeddings().weight
            embeddings, rows = local_rows(embeddings.detach(), self.control_ids)
            before = embeddings[rows].clone()
        self.optimizer.step()
        if scale_rows:
            # Adam's step size ignores gradient scale, so the rows' step itself is scaled.
            with torch.no_grad():
                embeddings[rows] = before + factor * (embeddings[rows] - before)
        self.scheduler.step()
        self.optimizer.zero_grad()
        stats["lr"] = self.scheduler.get_last_lr()[0]
        return stats
