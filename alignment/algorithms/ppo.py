"""PPO with a value head and a KL-shaped reward: the baseline of the Quark and ALT papers.

Each iteration the loop samples from the current policy (unconditioned) and scores; `update`
turns this iteration's `scored.jsonl` into episodes and runs trlx's TL;DR recipe on them
(`docs/algorithm.md` section 14 and its PPO section): old log-probabilities, reference
log-probabilities and values once without gradient; per-token rewards `-kl_coef * (logp -
ref_logp)` plus the clipped score on the last token; GAE; whitened advantages; then `ppo_epochs`
shuffled passes of minibatch steps on `policy_loss + vf_coef * value_loss`. The math is in
`alignment/ppo.py`; this file only batches and steps.

The value head is trlx's: an MLP d -> 2d -> ReLU -> 1 on the policy's last hidden state (after
the final norm), sharing the trunk, so the value loss also trains the unfrozen top blocks, as in
trlx's default (no separate value branch). A linear head would be cheaper; the MLP matches the
published baseline and costs 2d^2 parameters (33 M for GPT-J, small beside 6 B).

Under `accelerate launch` every rank reads the same episodes. The rollout forwards are split
across the ranks and gathered, so advantages, whitening and the KL controller see every episode
on every rank; each minibatch is split the same way, with each rank's loss weighted by its share
of the minibatch's tokens, so the DDP gradient of policy and value head (one wrapped module) is
the one-process gradient.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from alignment.algorithms.base import Models
from alignment.conditioning import Conditioning
from alignment.config import Config
from alignment.errors import UserError
from alignment.interfaces import ScoreFn
from alignment.losses import token_logprobs
from alignment.metrics import sequence_kl_estimate
from alignment.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from alignment.prompts import PromptRow
from alignment.records import load_samples
from alignment.trainer import (
    Batch,
    collate,
    encode_prompt,
    encode_target,
    freeze_bottom_layers,
    global_token_means,
    rank_share,
    shard_slice,
    target_logprobs,
)

log = logging.getLogger(__name__)

VALUE_HEAD = "value_head.safetensors"
PPO_STATE = "ppo_state.json"
TOKEN_MEANS = [
    "loss",
    "policy_loss",
    "clip_fraction",
    "approx_kl",
    "value_loss",
    "value_clip_fraction",
]


class ValueHead(nn.Module):
    """V(state) from the last hidden state: trlx's MLP d -> 2d -> ReLU -> 1."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, 1)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """(b, t, d) -> (b, t)."""
        return self.net(hidden).squeeze(-1)


class PolicyValue(nn.Module):
    """Policy and value head as one module, so that one DDP wrapper synchronises both."""

    def __init__(self, policy: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """log p and V of every target token of `batch`, (b, t) each; V is read before the token."""
        device = next(self.value_head.parameters()).device
        t = batch.labels.shape[1]
        out = self.policy(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
            output_hidden_states=True,
            logits_to_keep=t + 1,
        )
        logprobs = token_logprobs(out.logits[:, :-1].float(), batch.labels.to(device))
        values = self.value_head(out.hidden_states[-1][:, -(t + 1) : -1].float())
        return logprobs, values


class PPO:
    """Unconditioned policy, value head, one AdamW at a constant learning rate, a KL controller."""

    conditioning: Conditioning | None = None
    samples_itself = False

    def __init__(
        self, config: Config, models: Models, accelerator: Accelerator, score: ScoreFn
    ) -> None:
        cfg = self.cfg = config.ppo
        self.config, self.tokenizer, self.reference = config, models.tokenizer, models.reference
        self.accelerator = accelerator
        if config.sampling.temperature != 1.0 or config.sampling.top_p != 1.0:
            log.warning(
                "ppo samples with temperature %s, top_p %s: the rollout is then off-policy "
                "(set both to 1.0)",
                config.sampling.temperature,
                config.sampling.top_p,
            )
        policy = models.policy
        frozen, total = freeze_bottom_layers(policy, cfg.unfrozen_layers_ratio)
        if cfg.freeze_embeddings:
            policy.get_input_embeddings().weight.requires_grad_(False)
        log.info("ppo trains the top %d of %d blocks", total - frozen, total)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the same initial value head for the same config
            self.value_head = ValueHead(policy.config.get_text_config().hidden_size)
        self.value_head.to(policy.device)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable + list(self.value_head.parameters()),
            lr=cfg.learning_rate,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.device = policy.device
        self.model, self.optimizer = accelerator.prepare(
            PolicyValue(policy, self.value_head), optimizer
        )
        self.kl_controller: FixedKLController | AdaptiveKLController = (
            FixedKLController(cfg.init_kl_coef)
            if cfg.target_kl is None
            else AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
        )
        # The policy weights are the loop's checkpoint; the training state holds the rest.
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
        accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())

    @staticmethod
    def conditioning_for(config: Config) -> Conditioning | None:
        return None

    def save_state(self, folder: Path) -> None:
        """Optimizer and RNG state (accelerate), the value head and the KL coefficient (the same
        on every rank: the main process writes them)."""
        self.accelerator.save_state(str(folder), safe_serialization=True)
        if self.accelerator.is_main_process:
            save_file(self.value_head.state_dict(), str(Path(folder) / VALUE_HEAD))
            kl_coef = {"kl_coef": self.kl_controller.value}
            (Path(folder) / PPO_STATE).write_text(json.dumps(kl_coef))

    def load_state(self, folder: Path) -> None:
        self.accelerator.load_state(str(folder))
        device = str(next(self.value_head.parameters()).device)
        self.value_head.load_state_dict(load_file(str(Path(folder) / VALUE_HEAD), device=device))
        self.kl_controller.value = json.loads((Path(folder) / PPO_STATE).read_text())["kl_coef"]

    def _episodes(self, path: Path) -> tuple[list[list[int]], list[list[int]], list[float], dict]:
        """(prompt ids, generation ids, score) per usable generation, and what was skipped.

        A generation without a usable score (None) cannot be rewarded, and one that tokenizes to
        nothing has no action to credit: both are left out and counted.
        """
        prompts, targets, scores = [], [], []
        skipped = {"skipped_unscored": 0, "skipped_empty": 0}
        max_new = self.config.sampling.max_new_tokens
        for record in load_samples(path):
            prompt = encode_prompt(self.tokenizer, record.prompt, self.config.sampling)
            reasons = record.finish_reasons or ["stop"] * len(record.generations)
            rewards = record.rewards or [None] * len(record.generations)
            for text, reason, reward in zip(record.generations, reasons, rewards, strict=True):
                target = encode_target(self.tokenizer, text, reason != "length", max_new)
                if reward is None:
                    skipped["skipped_unscored"] += 1
                elif not target:
                    skipped["skipped_empty"] += 1
                else:
                    prompts.append(prompt)
                    targets.append(target)
                    scores.append(reward)
        if len(targets) < 2:
            raise UserError(f"{path}: {len(targets)} usable scored generations; ppo needs >= 2")
        return prompts, targets, scores, skipped

    def update(self, iteration: int, it_dir: Path, seed: int, rows: list[PromptRow]) -> list[dict]:
        cfg = self.cfg
        prompts, targets, score_list, skipped = self._episodes(it_dir / "scored.jsonl")
        pad, n = self.tokenizer.pad_token_id, len(targets)

        # Rollout: old log-probs, values and reference log-probs, once, without gradient; each
        # rank its share of the episodes, then all of them on every rank. Not through the DDP
        # wrapper: the ranks may run different numbers of these forwards.
        acc, module = self.accelerator, self.accelerator.unwrap_model(self.model)
        part = shard_slice(n, acc.process_index, acc.num_processes)
        logprob_rows, value_rows = [], []
        with torch.no_grad():
            for start in range(part.start, part.stop, cfg.batch_size):
                stop = min(start + cfg.batch_size, part.stop)
                batch = collate(prompts[start:stop], targets[start:stop], pad)
                logprobs, values = module(batch)
                for lp, v, k in zip(logprobs, values, batch.label_mask.sum(-1), strict=True):
                    logprob_rows.append(lp[:k].cpu())
                    value_rows.append(v[:k].cpu())
        ref_rows = target_logprobs(
            self.reference, prompts[part], targets[part], pad, cfg.batch_size
        )
        logprob_rows, value_rows, ref_rows = (
            gather_object(rows) for rows in (logprob_rows, value_rows, ref_rows)
        )
        old_logprobs = pad_sequence(logprob_rows, batch_first=True)
        old_values = pad_sequence(value_rows, batch_first=True)
        ref_logprobs = pad_sequence(ref_rows, batch_first=True)
        mask = pad_sequence([torch.ones(len(t)) for t in targets], batch_first=True)
        scores = torch.tensor(score_list)

        # KL-shaped rewards, GAE
        kl_coef = self.kl_controller.value
        rewards = kl_penalized_rewards(
            old_logprobs, ref_logprobs, scores, mask, kl_coef, cfg.cliprange_reward
        )
        advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        rollout_kl = float(sequence_kl_estimate(old_logprobs, ref_logprobs, mask).mean())
        common = {
            "score_mean": float(scores.mean()),
            "rollout_kl": rollout_kl,
            "kl_coef": kl_coef,
            "episodes": n,
            **skipped,
        }

        # PPO epochs of shuffled minibatches (the same order on every rank), each rank its share
        rng = random.Random(seed)
        history: list[dict] = []
        device = self.device
        steps = cfg.ppo_epochs * -(-n // cfg.batch_size)
        progress = tqdm(total=steps, desc="ppo", unit="step", disable=not acc.is_main_process)
        for _ in range(cfg.ppo_epochs):
            order = list(range(n))
            rng.shuffle(order)
            for start in range(0, n, cfg.batch_size):
                rows, weight, local_tokens, global_tokens = rank_share(
                    acc, order[start : start + cfg.batch_size], lambda i: len(targets[i])
                )
                batch = collate([prompts[i] for i in rows], [targets[i] for i in rows], pad)
                t = batch.labels.shape[1]

                def take(x: Tensor, rows: list[int] = rows, t: int = t) -> Tensor:
                    return x[rows, :t].to(device)

                logprobs, values = self.model(batch)
                m = take(mask)
                pg, pg_stats = policy_loss(
                    logprobs, take(old_logprobs), take(advantages), m, cfg.cliprange
                )
                vf, vf_stats = value_loss(
                    values, take(old_values), take(returns), m, cfg.cliprange_value
                )
                loss = pg + cfg.vf_coef * vf
                acc.backward(loss * weight)
                stats = {"loss": float(loss.detach()), **pg_stats, **vf_stats}
                stats = global_token_means(acc, stats, TOKEN_MEANS, local_tokens, global_tokens)
                if cfg.max_grad_norm is not None:
                    stats["grad_norm"] = float(
                        acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    )
                self.optimizer.step()
                self.optimizer.zero_grad()
                history.append({**stats, **common})
                progress.update()
                progress.set_postfix(loss=f"{stats['loss']:.3f}")
        progress.close()
        # Ziegler et al.: one controller update per batch of rollouts (trlx: after every step)
        self.kl_controller.update(rollout_kl, n)
        return history
