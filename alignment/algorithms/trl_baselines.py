"""GRPO and RLOO baselines, run by trl's own trainers on the loop's prompts and reward.

trl's trainers sample on-policy inside their training step, so these algorithms sample
themselves (`samples_itself`): each iteration builds a fresh trl trainer over the iteration's
prompts, which draws `data.samples_per_prompt` generations of each prompt once (the sampling
budget of every algorithm), scores them with the run's reward and steps on them. What trl drew
and the rewards it trained on are then written to `scored.jsonl`, so sample counts, reports and
resumes treat these runs like any other. docs/algorithm.md ("GRPO and RLOO through trl") says
what trl computes.

A new trainer per iteration means a new AdamW and learning-rate schedule per iteration (as
Quark's default `train.reset_optimizer`), so there is no optimizer state to checkpoint, and a run
killed mid-update redoes that iteration's update from the last checkpoint.

Under `accelerate launch` trl itself splits each generation batch across the ranks and
synchronises the gradients; each rank scores and records its own completions, and the records
are gathered so that the main process writes the whole of `scored.jsonl`. The per-device batch
stays `batch_size`, so an optimizer step still covers `prompts_per_step` prompts in all.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from accelerate import Accelerator
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import PreTrainedModel, PrinterCallback, Trainer, TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.trainer.utils import add_fused_lm_head

from alignment.algorithms.base import Models
from alignment.conditioning import Conditioning
from alignment.config import Config, GroupRLConfig
from alignment.errors import UserError
from alignment.interfaces import ScoreFn
from alignment.models import stop_token_ids
from alignment.prompts import PromptRow, truncate_middle
from alignment.records import FinishReason, SampleRecord, save_samples

log = logging.getLogger(__name__)


class RecordingReward:
    """The run's reward in trl's reward-function convention, keeping every generation it scores.

    trl calls it once per generation batch with each completion's dataset row, so the record
    it keeps is exactly what trl drew and the rewards trl trained on (None stays None here; trl
    reads it as NaN, leaves it out of the group's baseline and gives it no advantage).
    """

    __name__ = "reward"  # trl logs each reward function's mean under its name

    def __init__(self, score: ScoreFn, prompts: list[PromptRow], stop_ids: Sequence[int]) -> None:
        self.score = score
        self.prompts = prompts
        self.stop_ids = set(stop_ids)
        self.generations: list[list[str]] = [[] for _ in prompts]
        self.rewards: list[list[float | None]] = [[] for _ in prompts]
        self.finish_reasons: list[list[FinishReason]] = [[] for _ in prompts]

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        row: list[int],
        **kwargs: Any,
    ) -> list[float | None]:
        # score against the raw prompt, as the loop does, not the copy trl saw (maybe cut)
        rewards = self.score([self.prompts[i].prompt for i in row], completions)
        for i, text, ids, reward in zip(row, completions, completion_ids, rewards, strict=True):
            self.generations[i].append(text)
            self.rewards[i].append(reward)
            self.finish_reasons[i].append("stop" if ids and ids[-1] in self.stop_ids else "length")
        return rewards

    @property
    def recorded(self) -> tuple[list[list[str]], list[list[float | None]], list[list[str]]]:
        """Generations, rewards and finish reasons per prompt: what another rank absorbs."""
        return self.generations, self.rewards, self.finish_reasons

    def absorb(self, recorded: tuple[list[list[Any]], ...]) -> None:
        """Add another rank's `recorded` (same prompts) after this one's own."""
        for mine, theirs in zip(self.recorded, recorded, strict=True):
            for row, extra in zip(mine, theirs, strict=True):
                row.extend(extra)

    def records(self, iteration: int, per_prompt: int) -> list[SampleRecord]:
        drawn = [len(g) for g in self.generations]
        if drawn != [per_prompt] * len(drawn):
            raise RuntimeError(f"trl drew {drawn} generations per prompt, not {per_prompt} each")
        return [
            SampleRecord(
                prompt=p.prompt,
                id=p.id,
                iteration=iteration,
                generations=gens,
                rewards=rewards,
                finish_reasons=finish,
            )
            for p, gens, rewards, finish in zip(
                self.prompts, self.generations, self.rewards, self.finish_reasons, strict=True
            )
        ]


class GroupRL:
    """One trl trainer per iteration, training `models.policy` in place (trl does not copy it)."""

    samples_itself = True
    trainer_class: ClassVar[type[Trainer]]
    args_class: ClassVar[type[TrainingArguments]]

    def __init__(
        self, config: Config, models: Models, accelerator: Accelerator, score: ScoreFn
    ) -> None:
        self.config = config
        self.models = models
        self.accelerator = accelerator
        self.score = score
        self.conditioning = self.conditioning_for(config)

    @staticmethod
    def conditioning_for(config: Config) -> Conditioning | None:
        return None

    def section(self) -> GroupRLConfig:
        raise NotImplementedError

    def method_args(self) -> dict[str, Any]:
        """trl arguments only this method has."""
        return {}

    def update(
        self, iteration: int, it_dir: Path, seed: int, prompts: list[PromptRow]
    ) -> list[dict]:
        section, per_prompt = self.section(), self.config.data.samples_per_prompt
        if len(prompts) % section.prompts_per_step:
            raise UserError(
                f"{len(prompts)} training prompts do not split into steps of "
                f"{section.section}.prompts_per_step={section.prompts_per_step}: trl would drop "
                f"the remainder; use a prompts_per_step that divides {len(prompts)}"
            )
        models = self.models
        policy, reference, tokenizer = models.policy, models.reference, models.tokenizer
        stop_ids = stop_token_ids(policy, tokenizer, self.config.sampling.stop_at_newline)
        reward = RecordingReward(self.score, prompts, stop_ids)
        dataset = Dataset.from_dict(
            {"prompt": [self._cut(p.prompt) for p in prompts], "row": list(range(len(prompts)))}
        )
        acc = self.accelerator
        output_dir = it_dir / "trl"
        if acc.is_main_process:
            shutil.rmtree(output_dir, ignore_errors=True)  # a killed update's leftovers
        acc.wait_for_everyone()
        with _forward_restored(policy, reference), _quiet_deprecations():
            with _generation_stops(policy, stop_ids):
                trainer = self.trainer_class(
                    model=policy,
                    reward_funcs=reward,
                    args=self._args(output_dir, seed),
                    train_dataset=dataset,
                    processing_class=tokenizer,
                )
            trainer.remove_callback(PrinterCallback)  # our log is train_log.jsonl
            if section.beta > 0:
                _use_reference(trainer, reference, section.beta)
            trainer.train()
        policy.eval()  # trl leaves it in training mode; the loop samples and evaluates next
        # each rank drew and scored its own share of the completions: the main process writes all
        recorded = gather_object([reward.recorded])
        if acc.is_main_process:
            for other in recorded[1:]:
                reward.absorb(other)
            shutil.rmtree(output_dir, ignore_errors=True)
            save_samples(it_dir / "scored.jsonl", reward.records(iteration, per_prompt))
        return [row for row in trainer.state.log_history if "train_runtime" not in row]

    def _cut(self, prompt: str) -> str:
        """The prompt as trl will see it: cut from the middle like the loop's sampler does
        (`sampling.max_prompt_tokens`), since trl would otherwise feed it whole."""
        sampling, tokenizer = self.config.sampling, self.models.tokenizer
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) <= sampling.max_prompt_tokens:
            return prompt
        return tokenizer.decode(
            truncate_middle(ids, sampling.max_prompt_tokens, sampling.keep_tail_tokens)
        )

    def _args(self, output_dir: Path, seed: int) -> TrainingArguments:
        section, data, sampling = self.section(), self.config.data, self.config.sampling
        generations_per_step = section.prompts_per_step * data.samples_per_prompt
        per_pass = section.batch_size * self.accelerator.num_processes
        if generations_per_step % per_pass:
            raise UserError(
                f"{section.section}.batch_size ({section.batch_size}) x "
                f"{self.accelerator.num_processes} processes must divide "
                f"{section.section}.prompts_per_step x data.samples_per_prompt "
                f"({generations_per_step}): every step's generations are split evenly across "
                "the processes"
            )
        return self.args_class(
            output_dir=str(output_dir),
            seed=seed,
            use_cpu=self.models.policy.device.type == "cpu",
            bf16=False,  # train in the model's own dtype (model.dtype), as the other algorithms
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            # each prompt once per iteration, prompts_per_step of them per optimizer step
            num_train_epochs=1,
            per_device_train_batch_size=section.batch_size,
            gradient_accumulation_steps=generations_per_step // per_pass,
            num_generations=data.samples_per_prompt,
            max_completion_length=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            learning_rate=section.learning_rate,
            num_iterations=section.num_iterations,
            epsilon=section.epsilon,
            max_grad_norm=section.max_grad_norm,
            activation_checkpointing=section.gradient_checkpointing,  # its new name
            beta=0.0,  # trl would load its own reference; `_use_reference` hands it ours
            **self.method_args(),
        )

    def save_state(self, folder: Path) -> None:
        """Nothing: every iteration starts a new trl trainer, with a new optimizer."""

    def load_state(self, folder: Path) -> None:
        """Nothing to restore (see save_state)."""


class GRPO(GroupRL):
    """GRPO: each generation's advantage is its reward standardized within its prompt's group."""

    trainer_class = GRPOTrainer
    args_class = GRPOConfig

    def section(self) -> GroupRLConfig:
        return self.config.grpo

    def method_args(self) -> dict[str, Any]:
        return {
            "loss_type": self.config.grpo.loss_type,
            "scale_rewards": self.config.grpo.scale_rewards,
        }


class RLOO(GroupRL):
    """RLOO: each generation's advantage is its reward minus the mean of its group's others."""

    trainer_class = RLOOTrainer
    args_class = RLOOConfig

    def section(self) -> GroupRLConfig:
        return self.config.rloo

    def method_args(self) -> dict[str, Any]:
        return {"normalize_advantages": self.config.rloo.normalize_advantages}


def _use_reference(trainer: Trainer, reference: PreTrainedModel, beta: float) -> None:
    """Give trl the run's reference model for the KL term.

    trl has no argument for it: with beta > 0 it loads a second copy of the model from the
    policy's `name_or_path`, which after a resume is the last checkpoint, not the reference.
    So the trainer is built with beta 0 (no copy) and then given ours, prepared as trl prepares
    its own (a fused LM head that returns token log-probabilities); trl reads both at run time.
    """
    add_fused_lm_head(reference, temperature=trainer.temperature)
    trainer.ref_model = reference
    trainer.beta = beta


@contextlib.contextmanager
def _forward_restored(*models: PreTrainedModel) -> Iterator[None]:
    """trl patches `forward` on the models it trains and scores with; put the originals back,
    or each iteration would wrap our models once more."""
    saved = [model.__dict__.get("forward") for model in models]
    try:
        yield
    finally:
        for model, forward in zip(models, saved, strict=True):
            if forward is None:
                model.__dict__.pop("forward", None)
            else:
                model.__dict__["forward"] = forward


@contextlib.contextmanager
def _generation_stops(policy: PreTrainedModel, stop_ids: list[int]) -> Iterator[None]:
    """trl ends a completion at every end id the model declares when the trainer is built: declare
    our stop tokens (newlines with `sampling.stop_at_newline`) for that moment only."""
    declared = policy.generation_config.eos_token_id
    policy.generation_config.eos_token_id = stop_ids
    try:
        yield
    finally:
        policy.generation_config.eos_token_id = declared


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """trl 1.16 still calls transformers' deprecated `is_gradient_checkpointing` (its own
    business, nothing a user can act on); keep it from printing in every iteration."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield
