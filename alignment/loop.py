"""The training loop every algorithm shares: sample -> score -> update -> evaluate, resumable.

Every stage of every iteration ends by atomically writing one file under `out_dir/iter_NNN/`
(or one checkpoint folder); a stage whose file exists is never redone. Seeds derive from
`seed + iteration`, and each checkpoint carries the optimizer, scheduler and RNG state, so
rerunning the same command after a crash at any point continues to the same result as an
uninterrupted run. The loop knows no algorithm's internals: `alignment.algorithms` maps the
config's `algorithm` to the update, and the sampler and reward are passed in.

Under `accelerate launch --num_processes N` every rank runs this loop on the same files: each
samples and scores its share of the prompts (`ShardedSampler`, `sharded_score`), the results are
gathered on every rank, and the main process alone writes a stage's file, after which all ranks
wait at a barrier. A rank therefore decides "this stage is done" only between barriers, when no
file is being written, and every rank decides the same. Evaluation samples and scores the same
way, and its teacher-forced likelihoods (reference perplexity, KL) too: each rank runs the
policy and reference forwards over its slice of the samples (`sharded_likelihood`), and the
per-sample values are gathered before they are averaged. Under FSDP 2 or ZeRO-3 the policy's
weights are sharded, and every sampling and evaluation stage runs with them gathered, every
checkpoint from them gathered on the main process (`alignment.sharding`). Resume a run with
the number of processes it started with: the samples depend on it, and each rank restores its
own RNG state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.adapters import write_adapter_base
from alignment.algorithms import ALGORITHMS, Algorithm, Models
from alignment.algorithms.base import SavesAdapter
from alignment.algorithms.best_of_n import write_best_of_n
from alignment.conditioning import Conditioning
from alignment.config import Config, SamplingConfig, config_to_dict, dump_config, load_config
from alignment.errors import UserError
from alignment.evaluation import (
    EVAL_SEED_OFFSET,
    LikelihoodFn,
    ScoredSamples,
    combine_likelihood_terms,
    evaluate,
    likelihood_terms,
    sample_conditioning_curve,
    scored_records,
)
from alignment.interfaces import FeedbackFn, Generation, Sampler, ScoreFn
from alignment.io import atomic_directory, atomic_write, write_jsonl
from alignment.metrics import summarize_rewards_by_quantile
from alignment.models import load_model_and_tokenizer, on_cpu, quantization_config
from alignment.plots import plot_iterations, plot_reward_by_quantile
from alignment.pool import DataPool
from alignment.prompts import PromptRow, demo_prompts_path, load_prompts
from alignment.records import SampleRecord, load_samples, save_samples
from alignment.sharding import (
    check_weight_sharding,
    loading_whole,
    whole_state_dict,
    whole_weights,
)
from alignment.trainer import shard_slice

log = logging.getLogger(__name__)

SamplerFactory = Callable[[PreTrainedModel, PreTrainedTokenizerBase, SamplingConfig], Sampler]
# Keys that may change between runs of the same run directory without invalidating it.
RESUMABLE_KEYS = {"iterations", "report_to"}
TRAINING_STATE = "training_state"
EVAL_SAMPLES = "eval_samples.jsonl"
TIMING = "timing.json"


def run(
    config: Config,
    score: ScoreFn,
    make_sampler: SamplerFactory,
    feedback: FeedbackFn | None = None,
) -> list[dict]:
    """Run (or resume) every iteration of `config`; returns the per-iteration metrics.

    `feedback` is the LLM feedback that alt-feedback trains on (no other algorithm takes one).
    """
    out = Path(config.out_dir)
    # First of all: the process group, and on a GPU each rank's own device, before any model loads.
    accelerator = Accelerator(
        cpu=on_cpu(config.model.device),
        log_with=config.report_to or None,
        project_dir=str(out),
    )
    check_weight_sharding(accelerator, config)
    main = accelerator.is_main_process
    # The main process holds the lock for the whole run: it alone writes the directory.
    with _run_dir_lock(out) if main else contextlib.nullcontext():
        _check_same_config(out, config, clean=main)
        accelerator.wait_for_everyone()  # no rank reads the directory while stale files go
        train_rows, eval_rows = _prompt_sets(config)
        factory = ALGORITHMS[config.algorithm]
        with loading_whole(accelerator):
            models = _load_models(config, out, factory.conditioning_for(config))
        # Only now, with config, prompts and models known good, does the directory become a run.
        if main:
            _claim_run_dir(out, config)
        sampler = make_sampler(models.policy, models.tokenizer, config.sampling)
        metrics = _iterate(
            config, out, accelerator, score, sampler, models, train_rows, eval_rows, feedback
        )
    # Torn down in order: the prepared (DDP, FSDP) modules released while the process group
    # lives, every rank done, then the group destroyed. Left to the end of `_iterate` or to the
    # interpreter's exit, a finished rank once aborted in gloo's threads ("terminate called
    # without an active exception") and once hung destroying DDP after the group was gone.
    del models
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    # The sampler last: vLLM's in-process engine, shut down, destroys its own groups and then
    # the default one, whoever made it (vLLM 0.32); accelerate then finds none to destroy.
    del sampler
    accelerator.end_training()
    return metrics


def _iterate(
    config: Config,
    out: Path,
    accelerator: Accelerator,
    score: ScoreFn,
    sampler: Sampler,
    models: Models,
    train_rows: list[PromptRow],
    eval_rows: list[PromptRow],
    feedback: FeedbackFn | None = None,
) -> list[dict]:
    main = accelerator.is_main_process
    # An algorithm that scores (trl's GRPO and RLOO) calls `score` on its own rank's completions;
    # the loop's stages call it on the same pairs on every rank, which the sharded one splits.
    own_score = score
    if accelerator.num_processes > 1:
        score = sharded_score(score, accelerator)
    if config.report_to:
        # trackers take scalars only (TensorBoard's hparams refuse lists)
        hparams = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in _flat(config_to_dict(config)).items()
        }
        accelerator.init_trackers("quark-alt", config=hparams)
    likelihood = None  # evaluate's own: every sample on this one process
    if accelerator.num_processes > 1:
        sampler = ShardedSampler(sampler, accelerator)
        likelihood = sharded_likelihood(accelerator)
    extra = {"feedback": feedback} if feedback is not None else {}
    algorithm = ALGORITHMS[config.algorithm](config, models, accelerator, own_score, **extra)
    _resume_training_state(algorithm, out)
    # `algorithm.conditioning` is read where it is used: alt-feedback fixes its exemplar during
    # iteration 1's update

    def evaluate_into(it_dir: Path, conditioned: bool, iteration: int, watch: Stopwatch) -> None:
        path = it_dir / "eval.json"
        if path.exists():
            return
        control = algorithm.conditioning if conditioned else None
        with whole_weights(models.policy, accelerator):
            result, scored = evaluate(
                sampler,
                models.policy,
                models.reference,
                models.tokenizer,
                eval_rows,
                score,
                config,
                control,
                likelihood,
            )
            if main:
                save_samples(it_dir / EVAL_SAMPLES, scored_records(eval_rows, scored, iteration))
            watch.lap("eval")
            if control is not None and config.eval.conditioning_curve:
                result["conditioning_curve"] = sample_conditioning_curve(
                    sampler,
                    eval_rows,
                    score,
                    control,
                    config.eval.samples_per_prompt,
                    seed=config.seed + EVAL_SEED_OFFSET,
                    best=scored,
                )
                watch.lap("conditioning_curve")
        if main:
            with atomic_write(path) as handle:
                json.dump({"iteration": iteration, **result}, handle, indent=1)
        accelerator.wait_for_everyone()

    evaluate_into(out / "iter_000", False, 0, Stopwatch(out / "iter_000", main))
    if config.algorithm == "best-of-n":  # trains nothing (iterations: 0)
        write_best_of_n(out, sampler, eval_rows, score, config, accelerator)
    for iteration in range(1, config.iterations + 1):
        it_dir = out / f"iter_{iteration:03d}"
        seed = config.seed + iteration
        watch = Stopwatch(it_dir, main)
        # 1. sample: the initial policy has not learned the controls, so it samples without
        #    them; later policies sample conditioned on the best one (an algorithm that
        #    samples itself does 1 and 2 inside its update)
        rows = iteration_prompts(train_rows, config.data.prompts_per_iteration, seed)
        samples_path = it_dir / "samples.jsonl"
        if not samples_path.exists() and not algorithm.samples_itself:
            control = algorithm.conditioning if iteration > 1 else None
            texts = [control.condition(r.prompt) if control else r.prompt for r in rows]
            with whole_weights(models.policy, accelerator):
                gens = sampler.sample(texts, config.data.samples_per_prompt, seed=seed)
            if main:
                save_samples(
                    samples_path,
                    [
                        SampleRecord(
                            prompt=r.prompt,
                            id=r.id,
                            iteration=iteration,
                            generations=[g.text for g in gs],
                            finish_reasons=[g.finish_reason for g in gs],
                        )
                        for r, gs in zip(rows, gens, strict=True)
                    ],
                )
            accelerator.wait_for_everyone()
            watch.lap("sample")
        # 2. score
        scored_path = it_dir / "scored.jsonl"
        if not scored_path.exists() and not algorithm.samples_itself:
            records = load_samples(samples_path)
            for record in records:
                record.rewards = score(
                    [record.prompt] * len(record.generations), record.generations
                )
            if config.reward.subtract_reference:
                references = {r.id: r.reference or "" for r in train_rows}  # checked at start
                _subtract_reference(records, references, score)
            if main:
                save_samples(scored_path, records)
            accelerator.wait_for_everyone()
            watch.lap("score")
        # 3. update (the algorithm's own stages), then checkpoint
        checkpoint = out / "checkpoints" / f"iter_{iteration:03d}"
        if not checkpoint.exists():
            history = algorithm.update(iteration, it_dir, seed, rows)
            if main:
                write_jsonl(it_dir / "train_log.jsonl", history)
            _save_checkpoint(models, algorithm, checkpoint, config, iteration, accelerator)
            accelerator.wait_for_everyone()
            watch.lap("update")
        # 4. evaluate, conditioned on the best control
        evaluate_into(it_dir, True, iteration, watch)
        metrics = _write_metrics(out, config, main)
        if config.report_to:
            scalars = {f"eval/{k}": v for k, v in metrics[-1].items() if isinstance(v, float)}
            accelerator.log(scalars, step=iteration)
    return _write_metrics(out, config, main)


def rank_seed(seed: int, rank: int, num_processes: int) -> int:
    """Each rank's sampling seed: distinct across ranks, and `seed` itself on one process."""
    return seed * num_processes + rank


class ShardedSampler:
    """A sampler whose `sample` splits the prompts across ranks and returns all of them on every
    rank, in order; each rank draws from its own seed (`rank_seed`), so a run's samples depend on
    the number of processes, as they would on the batch size."""

    def __init__(self, sampler: Sampler, accelerator: Accelerator) -> None:
        self.sampler, self.accelerator = sampler, accelerator

    def sample(
        self, prompts: list[str], num_samples: int, *, seed: int, greedy: bool = False
    ) -> list[list[Generation]]:
        acc = self.accelerator
        with acc.split_between_processes(list(prompts)) as mine:
            seed = rank_seed(seed, acc.process_index, acc.num_processes)
            drawn = self.sampler.sample(mine, num_samples, seed=seed, greedy=greedy) if mine else []
        return gather_object(drawn)


def sharded_score(score: ScoreFn, accelerator: Accelerator) -> ScoreFn:
    """`score` with the pairs split across ranks and the rewards gathered, in order, on all."""

    def sharded(prompts: list[str], completions: list[str]) -> list[float | None]:
        pairs = list(zip(prompts, completions, strict=True))
        with accelerator.split_between_processes(pairs) as mine:
            rewards = score([p for p, _ in mine], [c for _, c in mine]) if mine else []
        return gather_object(list(rewards))

    return sharded


def sharded_likelihood(accelerator: Accelerator) -> LikelihoodFn:
    """`evaluation.likelihood_metrics` with the samples split across ranks: each rank runs the
    forwards over its own slice and the per-sample terms are gathered, so every rank returns
    the metrics of all the samples without any rank scoring another's."""

    def sharded(
        policy: PreTrainedModel,
        reference: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        sampling: SamplingConfig,
        batch_size: int,
        scored: ScoredSamples,
    ) -> dict[str, float]:
        acc = accelerator
        part = shard_slice(len(scored.generations), acc.process_index, acc.num_processes)
        terms = likelihood_terms(policy, reference, tokenizer, sampling, batch_size, scored, part)
        return combine_likelihood_terms(gather_object([terms]))

    return sharded


def iteration_prompts(train_rows: list[PromptRow], count: int, seed: int) -> list[PromptRow]:
    """The prompts of one iteration: `count` drawn without replacement, seeded per iteration,
    so a resumed run and every algorithm (sampled by the loop or by itself) see the same ones."""
    return random.Random(seed).sample(train_rows, min(count, len(train_rows)))


class Stopwatch:
    """Wall seconds of each stage of one iteration that ran, kept in `it_dir/timing.json`.

    A lap is the time since the previous one (or the start), so call it right after a stage's
    file is written; a stage skipped on resume keeps the seconds its first run recorded.
    """

    def __init__(self, it_dir: Path, write: bool = True) -> None:
        self.path, self.write = it_dir / TIMING, write
        self.start = time.perf_counter()

    def lap(self, stage: str) -> None:
        if not self.write:  # another rank than the main process
            return
        now = time.perf_counter()
        seconds = json.loads(self.path.read_text()) if self.path.exists() else {}
        seconds[stage] = round(now - self.start, 3)
        with atomic_write(self.path) as handle:
            json.dump(seconds, handle, indent=1)
        self.start = time.perf_counter()


@contextlib.contextmanager
def _run_dir_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory; refuse at once when another run holds it.

    `flock` is released by the kernel when the holder dies, so a killed run never leaves the
    directory stuck, and two runs can never interleave their stage files.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = (out / ".lock").open("a+")
    except OSError as err:
        raise UserError(f"{out}: cannot write here ({err.strerror})") from err
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise UserError(
                f"{out} is in use by another run (pid {holder}); wait for it or use another out_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def _subtract_reference(
    records: list[SampleRecord], references: dict[str, str], score: ScoreFn
) -> None:
    """trlx's TL;DR shaping: reward(sample) - reward(the prompt's human summary), the summary
    scored once per prompt; the raw rewards stay in the record (None where either is None)."""
    ref_rewards = score([r.prompt for r in records], [references[str(r.id)] for r in records])
    for record, ref in zip(records, ref_rewards, strict=True):
        record.raw_rewards, record.reference_reward = record.rewards, ref
        record.rewards = [
            None if r is None or ref is None else r - ref for r in record.rewards or []
        ]


def _check_same_config(out: Path, config: Config, clean: bool = True) -> None:
    """Refuse a run directory made by another config; clean what a killed run left half-written
    (`clean`: the process that holds the lock)."""
    saved = out / "config.yaml"
    if not saved.exists():
        return
    # the saved config read as a config: a field added to the code since the run started takes
    # its default, which keeps the behaviour the run had (that is how fields are added)
    previous = _flat(config_to_dict(load_config(saved)))
    current = _flat(config_to_dict(config))
    differ = sorted(
        k
        for k in set(previous) | set(current)
        if k.split(".")[0] not in RESUMABLE_KEYS and previous.get(k) != current.get(k)
    )
    if differ:
        raise UserError(
            f"{out} holds a run of a different config (differs in: {', '.join(differ)}); "
            f"use another out_dir or the same config to resume"
        )
    log.info("resuming the run in %s", out)
    if not clean:
        return
    for stale in out.rglob(".*.tmp"):  # temp files and folders of a killed run (we hold the lock)
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def _claim_run_dir(out: Path, config: Config) -> None:
    with atomic_write(out / "config.yaml") as handle:
        handle.write(dump_config(config))
    with atomic_write(out / "state.json") as handle:
        json.dump({"git_revision": _git_revision(), "config": "config.yaml"}, handle, indent=1)


def _prompt_sets(config: Config) -> tuple[list[PromptRow], list[PromptRow]]:
    source = config.data.train_prompts
    path = demo_prompts_path() if source == "demo" else source
    rows = load_prompts(path)
    if config.reward.subtract_reference:
        missing = next((r for r in rows if r.reference is None), None)
        if missing is not None:
            raise UserError(
                f"{path}: row {missing.id} has no reference summary ('summary' or 'label'), "
                "which reward.subtract_reference needs for every prompt"
            )
    if config.data.eval_prompts is not None:
        return rows, load_prompts(config.data.eval_prompts, limit=config.data.num_eval_prompts)
    held_out = config.data.num_eval_prompts
    if len(rows) <= held_out:
        raise UserError(
            f"{source}: {len(rows)} prompts leave none for training after holding "
            f"out data.num_eval_prompts={held_out}"
        )
    return rows[:-held_out], rows[-held_out:]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest finished checkpoint of a run directory (what a resume and `eval` start from)."""
    done = sorted(p for p in (out / "checkpoints").glob("iter_*") if p.is_dir())
    return done[-1] if done else None


def _load_models(config: Config, out: Path, conditioning: Conditioning | None) -> Models:
    """The latest checkpoint of this run if any, else the initial policy, ready to condition."""
    mc = config.model
    # before any weights load: a setting this machine cannot honour fails at once
    reference_quantization = quantization_config(
        mc.reference_quantization, "model.reference_quantization"
    )
    latest = latest_checkpoint(out)
    policy, tokenizer = load_model_and_tokenizer(
        str(latest) if latest else mc.policy,
        dtype=mc.dtype,
        device=mc.device,
        trust_remote_code=mc.trust_remote_code,
    )
    if latest is None and conditioning is not None:
        conditioning.prepare(tokenizer, policy, seed=config.seed)
    reference, _ = load_model_and_tokenizer(
        mc.reference or mc.policy,
        dtype=mc.dtype,
        device=mc.device,
        trust_remote_code=mc.trust_remote_code,
        quantization=reference_quantization,
    )
    reference.requires_grad_(False)
    return Models(policy, tokenizer, reference)


def _resume_training_state(algorithm: Algorithm, out: Path) -> None:
    latest = latest_checkpoint(out)
    if latest is None:
        return
    state = latest / TRAINING_STATE
    if state.is_dir():
        algorithm.load_state(state)
    else:
        log.warning("%s has no %s: the optimizer restarts from scratch", latest, TRAINING_STATE)


MODEL_CARD = """---
tags: [quark-alt, {algorithm}, rlhf]
---
# {name}

Policy trained with `{algorithm}` by quark-alt: iteration {iteration} of `{out_dir}`, from
`{policy}`.

{how}
"""

CONDITIONED = """It was trained to continue a prompt conditioned on a control, `{best}` (best) to
`{worst}` (worst), placed as a **{placement}** (`conditioning.json` in this folder says so, and
`quark-alt generate` reads it). For aligned behaviour condition on the best control:

```bash
quark-alt generate {path} "SUBREDDIT: r/... TITLE: ... POST: ... TL;DR:"
```

or in Python: `prompt = "{best}" + prompt` (prefix) / `prompt + "{best}"` (suffix), and never let
the model generate the control tokens."""

UNCONDITIONED = """It is a plain causal LM: prompt it as the initial policy
(`quark-alt generate {path} "..."`)."""

ADAPTER = """

This folder holds a LoRA adapter, not the weights: quark-alt's commands load it by merging it
into its base (`adapter_base.json`), which needs every earlier checkpoint of the run."""


def _save_checkpoint(
    models: Models,
    algorithm: Algorithm,
    path: Path,
    config: Config,
    iteration: int,
    accelerator: Accelerator,
) -> None:
    """Model (or with `train.lora.checkpoint=adapter` the iteration's adapter and the name of its
    base), tokenizer, conditioning, model card and training state, as one atomic folder.

    The main process makes the folder and writes the model; every rank writes its part of the
    training state into it (accelerate saves each rank's RNG state), and only when all have
    written does the main process rename it into place.
    """
    conditioning = algorithm.conditioning
    main = accelerator.is_main_process
    with atomic_directory(path) if main else contextlib.nullcontext() as tmp:
        if main:  # made here, so that an algorithm with nothing to save resumes without a warning
            (tmp / TRAINING_STATE).mkdir()
        tmp = broadcast_object_list([tmp])[0]  # after the mkdir: no rank writes before it
        algorithm.save_state(tmp / TRAINING_STATE)
        weights = whole_state_dict(models.policy, accelerator)
        accelerator.wait_for_everyone()
        if not main:
            return
        lora = config.train.lora
        if lora is not None and lora.checkpoint == "adapter":
            # only algorithms that read `train` (ALGORITHM_SECTIONS) can have train.lora
            cast(SavesAdapter, algorithm).save_adapter(tmp)
            write_adapter_base(tmp, iteration, config.model.policy, models.policy.dtype)
        else:
            models.policy.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        models.tokenizer.save_pretrained(tmp)
        if conditioning is not None:
            conditioning.save(tmp)
            how = CONDITIONED.format(
                best=conditioning.best,
                worst=conditioning.controls[-1],
                placement=conditioning.placement,
                path=path,
            )
        else:
            how = UNCONDITIONED.format(path=path)
        if lora is not None and lora.checkpoint == "adapter":
            how += ADAPTER
        (tmp / "README.md").write_text(
            MODEL_CARD.format(
                algorithm=config.algorithm,
                name=path.name,
                iteration=iteration,
                out_dir=config.out_dir,
                policy=config.model.policy,
                how=how,
            )
        )
    # Only the newest training state is ever resumed from; older ones are dead weight (for
    # GPT-J, the optimizer state is twice the trainable weights).
    for older in path.parent.glob(f"iter_*/{TRAINING_STATE}"):
        if older.parent != path:
            shutil.rmtree(older)


def _write_metrics(out: Path, config: Config, write: bool = True) -> list[dict]:
    """Rebuild metrics.jsonl and the plots from the per-iteration files (never appended twice);
    `write`: the main process, the only one that writes them."""
    rows = []
    by_quantile: dict[int, dict[int, float]] = {}
    for iteration in range(config.iterations + 1):
        it_dir = out / f"iter_{iteration:03d}"
        if (it_dir / "eval.json").exists():
            rows.append(json.loads((it_dir / "eval.json").read_text()))
        if write and (it_dir / "pool.jsonl").exists():
            records = DataPool.load(it_dir / "pool.jsonl").records
            by_quantile[iteration] = summarize_rewards_by_quantile(
                [r for rec in records for r in rec.rewards or []],
                [q for rec in records for q in rec.quantiles or []],
            )
    if not write:
        return rows
    write_jsonl(out / "metrics.jsonl", rows)
    plot_iterations(
        [{"iteration": r["iteration"], **{f"eval/{k}": v for k, v in r.items()}} for r in rows],
        out / "plots" / "reward_per_iteration.png",
    )
    if by_quantile:
        plot_reward_by_quantile(by_quantile, out / "plots" / "reward_by_quantile.png")
    return rows


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
