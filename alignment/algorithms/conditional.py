"""Reward-ranked conditional training: Quark, ALT-RM, and rejection-sampling fine-tuning (RFT).

All keep a pool of scored generations, rank each prompt's generations into quantiles and train
the policy with the conditional-LM objective on a balanced draw. Quark trains on every quantile,
each conditioned on its own control token, and samples with the best one; ALT-RM does the same
with a feedback phrase in plain text instead of a new token. RFT (also called expert iteration)
trains on the best quantile only, unconditioned: it is the ablation that shows what conditioning
on all the quantiles adds over simply imitating the best samples.
"""

from __future__ import annotations

import random
from pathlib import Path

from accelerate import Accelerator

from alignment.algorithms.base import Models
from alignment.conditioning import Conditioning
from alignment.config import Config
from alignment.interfaces import ScoreFn
from alignment.pool import DataPool, TrainItem
from alignment.prompts import PromptRow
from alignment.records import load_samples
from alignment.trainer import ConditionalTrainer


class Quark:
    """Pool -> quantiles -> conditional trainer, as ALT's Quark baseline."""

    samples_itself = False

    def __init__(
        self, config: Config, models: Models, accelerator: Accelerator, score: ScoreFn
    ) -> None:
        self.config, self.accelerator = config, accelerator
        self.num_buckets = config.pool.num_quantiles
        self.conditioning = self.conditioning_for(config)
        self.trainer = ConditionalTrainer(
            models.policy,
            models.tokenizer,
            config.train,
            config.sampling,
            self.conditioning,
            accelerator,
            reference=models.reference if config.train.kl_coef > 0 else None,
        )

    @staticmethod
    def conditioning_for(config: Config) -> Conditioning | None:
        return Conditioning.quantile_tokens(
            config.pool.num_quantiles, config.conditioning.placement
        )

    def update(
        self, iteration: int, it_dir: Path, seed: int, prompts: list[PromptRow]
    ) -> list[dict]:
        pool = self._pool(iteration, it_dir, seed)
        items = self.select(
            pool.draw(
                self.config.pool.num_samples_per_quantile, self.num_buckets, random.Random(seed)
            )
        )
        return self.trainer.train(items, seed=seed, total_iterations=self.config.iterations)

    def select(self, items: list[TrainItem]) -> list[TrainItem]:
        """Which drawn items train: all of them (each conditioned on its own quantile)."""
        return items

    def _pool(self, iteration: int, it_dir: Path, seed: int) -> DataPool:
        """This iteration's pool: the previous one flushed, the new samples added, re-ranked."""
        path = it_dir / "pool.jsonl"
        if path.exists():
            return DataPool.load(path)
        previous = it_dir.parent / f"iter_{iteration - 1:03d}" / "pool.jsonl"
        pool = DataPool.load(previous) if previous.exists() else DataPool()
        # ALT's order: flush old data, add the new, re-bucket the union
        pool.flush(self.config.pool.drop_factor, random.Random(seed))
        self._add(pool, it_dir)
        if self.accelerator.is_main_process:  # every rank built the same pool
            pool.save(path)
        return pool

    def _add(self, pool: DataPool, it_dir: Path) -> None:
        """Add the iteration's samples to the flushed pool and bucket the union by reward."""
        pool.add(load_samples(it_dir / "scored.jsonl"))
        pool.requantize(self.config.pool.num_quantiles, self.config.pool.scope)

    def save_state(self, folder: Path) -> None:
        self.trainer.save_state(folder)

    def load_state(self, folder: Path) -> None:
        self.trainer.load_state(folder)

    def save_adapter(self, folder: Path) -> None:
        self.trainer.save_adapter(folder)


class RejectionSampling(Quark):
    """RFT: fine-tune on each prompt's best quantile only, without any control token."""

    @staticmethod
    def conditioning_for(config: Config) -> Conditioning | None:
        return None

    def select(self, items: list[TrainItem]) -> list[TrainItem]:
        return [item for item in items if item.quantile == 0]


class AltRM(Quark):
    """ALT-RM: Quark with each quantile's feedback phrase as text (`Excellent. input: ...`)."""

    @staticmethod
    def conditioning_for(config: Config) -> Conditioning | None:
        template = config.feedback.template
        controls = tuple(template.format(phrase=p) for p in config.feedback.phrases)
        return Conditioning("text", controls, config.conditioning.placement)
