"""The contract between the loop and an algorithm.

The loop owns everything every method shares: prompts, sampling, scoring, evaluation,
checkpoints and resuming. An algorithm owns only its update: what it learns from one iteration's
scored samples, and which conditioning (if any) its policy is sampled and evaluated with. An
algorithm whose trainer draws its own generations (GRPO and RLOO through trl) says so with
`samples_itself`; the loop then leaves sampling and scoring to its update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.conditioning import Conditioning
from alignment.config import Config
from alignment.interfaces import ScoreFn
from alignment.prompts import PromptRow


@dataclass
class Models:
    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reference: PreTrainedModel


class Algorithm(Protocol):
    conditioning: Conditioning | None
    """What the policy is conditioned on from iteration 2 on and at evaluation; None: nothing.
    Read by the loop when it is used: it may be set during iteration 1's update."""
    samples_itself: bool
    """True: `update` samples and scores the iteration's prompts itself (on-policy, inside its
    trainer) and writes `scored.jsonl`; the loop skips its own sample and score stages."""

    @staticmethod
    def conditioning_for(config: Config) -> Conditioning | None:
        """The conditioning a run of `config` trains, known before any model is loaded."""
        ...

    def update(
        self, iteration: int, it_dir: Path, seed: int, prompts: list[PromptRow]
    ) -> list[dict]:
        """Learn from `it_dir/scored.jsonl`; return one stats row per optimizer step.

        `prompts` are the iteration's prompts, those the loop sampled `scored.jsonl` from; an
        algorithm that `samples_itself` samples them and leaves `scored.jsonl` (the
        generations it drew and their rewards) behind instead. Files it writes under `it_dir`
        are its own stage files: each is written atomically and skipped when it already
        exists, so a resumed update redoes nothing that finished.
        """
        ...

    def save_state(self, folder: Path) -> None:
        """Everything besides the policy weights that a resumed run needs to continue exactly."""
        ...

    def load_state(self, folder: Path) -> None: ...


class SavesAdapter(Protocol):
    """An algorithm that trains LoRA adapters through the conditional trainer (`train.lora`)."""

    def save_adapter(self, folder: Path) -> None:
        """Write the last update's adapter, and what it needs of its base, into a checkpoint
        folder (`alignment.adapters`)."""
        ...


class AlgorithmFactory(Protocol):
    def __call__(
        self, config: Config, models: Models, accelerator: Accelerator, score: ScoreFn
    ) -> Algorithm:
        """`score` is the run's reward, for methods that score more than the loop's samples; on
        several processes each rank calls it on its own pairs (it is not the loop's sharded one).

        alt-feedback's factory also takes `feedback=` (an `interfaces.FeedbackFn`); the loop
        passes it only when the run was given one."""
        ...

    def conditioning_for(self, config: Config) -> Conditioning | None: ...
