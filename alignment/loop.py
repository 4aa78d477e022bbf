"""The Quark loop: sample -> score -> quantile (pool) -> train -> evaluate, resumable.

Every stage of every iteration ends by atomically writing one file under `out_dir/iter_NNN/`
(or one checkpoint folder); a stage whose file exists is never redone. Seeds derive from
`seed + iteration`, so rerunning the same command after a crash at any point continues to the
same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.conditioning import add_control_tokens, condition_prompt, quantile_token
from alignment.config import Config, config_to_dict, dump_config
from alignment.errors import UserError
from alignment.evaluation import ScoreFn, evaluate
from alignment.io import atomic_write, write_jsonl
from alignment.metrics import summarize_rewards_by_quantile
from alignment.models import load_model_and_tokenizer
from alignment.plots import plot_iterations, plot_reward_by_quantile
from alignment.pool import DataPool
from alignment.prompts import PromptRow, demo_prompts_path, load_prompts
from alignment.records import SampleRecord, load_samples, save_samples
from alignment.trainer import ConditionalTrainer
from samplers import HFSampler

log = logging.getLogger(__name__)

# Keys that may change between runs of the same run directory without invalidating it.
RESUMABLE_KEYS = {"iterations", "report_to"}


@dataclass
class Models:
    policy: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reference: PreTrainedModel


def run(config: Config, score: ScoreFn) -> list[dict]:
    """Run (or resume) every iteration of `config`; returns the per-iteration metrics."""
    out = Path(config.out_dir)
    _claim_run_dir(out, config)
    train_rows, eval_rows = _prompt_sets(config)
    accelerator = Accelerator(
        cpu=config.model.device == "cpu", log_with=config.report_to or None, project_dir=str(out)
    )
    if config.report_to:
        # trackers take scalars only (TensorBoard's hparams refuse lists)
        hparams = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in _flat(config_to_dict(config)).items()
        }
        accelerator.init_trackers("quark-alt", config=hparams)
    models = _load_models(config, out)
    sampler = HFSampler(models.policy, models.tokenizer, config.sampling)
    trainer = ConditionalTrainer(
        models.policy,
        models.tokenizer,
        config.train,
        config.sampling,
        config.quark.control_placement,
        accelerator,
        reference=models.reference if config.train.kl_coef > 0 else None,
    )
    best = quantile_token(0)

    def evaluate_into(path: Path, conditioned: bool, iteration: int) -> None:
        if path.exists():
            return
        result = evaluate(
            sampler,
            models.policy,
            models.reference,
            models.tokenizer,
            eval_rows,
            score,
            config,
            control=best if conditioned else None,
        )
        with atomic_write(path) as handle:
            json.dump({"iteration": iteration, **result}, handle, indent=1)

    evaluate_into(out / "iter_000" / "eval.json", conditioned=False, iteration=0)
    for iteration in range(1, config.iterations + 1):
        it_dir = out / f"iter_{iteration:03d}"
        seed = config.seed + iteration
        # 1. sample: the initial policy without conditioning, later ones conditioned on the best
        samples_path = it_dir / "samples.jsonl"
        if not samples_path.exists():
            rows = random.Random(seed).sample(
                train_rows, min(config.data.prompts_per_iteration, len(train_rows))
            )
            control = best if iteration > 1 else None
            texts = [
                condition_prompt(r.prompt, control, config.quark.control_placement)
                if control
                else r.prompt
                for r in rows
            ]
            gens = sampler.sample(texts, config.quark.samples_per_prompt, seed=seed)
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
        # 2. score
        scored_path = it_dir / "scored.jsonl"
        if not scored_path.exists():
            records = load_samples(samples_path)
            for record in records:
                record.rewards = score(
                    [record.prompt] * len(record.generations), record.generations
                )
            save_samples(scored_path, records)
        # 3. quantiles and pool
        pool_path = it_dir / "pool.jsonl"
        if not pool_path.exists():
            previous = out / f"iter_{iteration - 1:03d}" / "pool.jsonl"
            pool = DataPool.load(previous) if previous.exists() else DataPool()
            # ALT's order: flush old data, add the new, re-bucket the union
            pool.flush(config.quark.drop_factor, random.Random(seed))
            pool.add(load_samples(scored_path))
            pool.requantize(config.quark.num_quantiles, config.quark.scope)
            pool.save(pool_path)
        # 4. train, then checkpoint
        checkpoint = out / "checkpoints" / f"iter_{iteration:03d}"
        if not checkpoint.exists():
            items = DataPool.load(pool_path).draw(
                config.quark.num_samples_per_quantile,
                config.quark.num_quantiles,
                random.Random(seed),
            )
            history = trainer.train(items, seed=seed, total_iterations=config.iterations)
            write_jsonl(it_dir / "train_log.jsonl", history)
            _save_checkpoint(models, checkpoint, config, iteration)
        # 5. evaluate, conditioned on the best token
        evaluate_into(it_dir / "eval.json", conditioned=True, iteration=iteration)
        metrics = _write_metrics(out, config)
        if config.report_to:
            scalars = {f"eval/{k}": v for k, v in metrics[-1].items() if isinstance(v, float)}
            accelerator.log(scalars, step=iteration)
    if config.report_to:
        accelerator.end_training()
    return _write_metrics(out, config)


def _claim_run_dir(out: Path, config: Config) -> None:
    """Write config.yaml and state.json, or refuse a run directory made by another config."""
    saved = out / "config.yaml"
    current = config_to_dict(config)
    if saved.exists():
        previous = yaml.safe_load(saved.read_text())
        differ = sorted(
            k
            for k in set(_flat(previous)) | set(_flat(current))
            if k.split(".")[0] not in RESUMABLE_KEYS
            and _flat(previous).get(k) != _flat(current).get(k)
        )
        if differ:
            raise UserError(
                f"{out} holds a run of a different config (differs in: {', '.join(differ)}); "
                f"use another out_dir or the same config to resume"
            )
        log.info("resuming the run in %s", out)
        for stale in out.rglob(".*.tmp"):  # what a killed run was writing; never renamed
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    with atomic_write(saved) as handle:
        handle.write(dump_config(config))
    with atomic_write(out / "state.json") as handle:
        json.dump({"git_revision": _git_revision(), "config": str(saved)}, handle, indent=1)


def _prompt_sets(config: Config) -> tuple[list[PromptRow], list[PromptRow]]:
    source = config.data.train_prompts
    rows = load_prompts(demo_prompts_path() if source == "demo" else source)
    if config.data.eval_prompts is not None:
        return rows, load_prompts(config.data.eval_prompts, limit=config.data.num_eval_prompts)
    held_out = config.data.num_eval_prompts
    if len(rows) <= held_out:
        raise UserError(
            f"{source}: {len(rows)} prompts leave none for training after holding "
            f"out data.num_eval_prompts={held_out}"
        )
    return rows[:-held_out], rows[-held_out:]


def _load_models(config: Config, out: Path) -> Models:
    """The latest checkpoint of this run if any, else the initial policy with control tokens."""
    mc = config.model
    done = sorted((out / "checkpoints").glob("iter_*"))
    source = str(done[-1]) if done else mc.policy
    policy, tokenizer = load_model_and_tokenizer(
        source, dtype=mc.dtype, device=mc.device, trust_remote_code=mc.trust_remote_code
    )
    if not done:
        add_control_tokens(tokenizer, policy, config.quark.num_quantiles, seed=config.seed)
    reference, _ = load_model_and_tokenizer(
        mc.reference or mc.policy,
        dtype=mc.dtype,
        device=mc.device,
        trust_remote_code=mc.trust_remote_code,
    )
    reference.requires_grad_(False)
    return Models(policy, tokenizer, reference)


MODEL_CARD = """---
tags: [quark-alt, quark, rlhf]
---
# {name}

Policy trained with Quark by quark-alt: iteration {iteration} of `{out_dir}`, from `{policy}`.

It was trained to continue a prompt conditioned on a reward-quantile token:
`_QUANTILE_TOKEN_0_` (best) to `_QUANTILE_TOKEN_{last}_` (worst), placed as a **{placement}**.
For aligned behaviour condition on the best token:

```bash
quark-alt generate {path} "SUBREDDIT: r/... TITLE: ... POST: ... TL;DR:" --placement {placement}
```

or in Python: `prompt = "_QUANTILE_TOKEN_0_" + prompt` (prefix) / `prompt + "_QUANTILE_TOKEN_0_"`
(suffix), and never let the model generate the control tokens.
"""


def _save_checkpoint(models: Models, path: Path, config: Config, iteration: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    models.policy.save_pretrained(tmp, safe_serialization=True)
    models.tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        MODEL_CARD.format(
            name=path.name,
            iteration=iteration,
            out_dir=config.out_dir,
            policy=config.model.policy,
            last=config.quark.num_quantiles - 1,
            placement=config.quark.control_placement,
            path=path,
        )
    )
    tmp.replace(path)


def _write_metrics(out: Path, config: Config) -> list[dict]:
    """Rebuild metrics.jsonl and the plots from the per-iteration files (never appended twice)."""
    rows = []
    by_quantile: dict[int, dict[int, float]] = {}
    for iteration in range(config.iterations + 1):
        it_dir = out / f"iter_{iteration:03d}"
        if (it_dir / "eval.json").exists():
            rows.append(json.loads((it_dir / "eval.json").read_text()))
        if (it_dir / "pool.jsonl").exists():
            records = DataPool.load(it_dir / "pool.jsonl").records
            by_quantile[iteration] = summarize_rewards_by_quantile(
                [r for rec in records for r in rec.rewards or []],
                [q for rec in records for q in rec.quantiles or []],
            )
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
