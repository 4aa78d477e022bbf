"""`algorithm: best-of-n`: no training; the initial policy's best of N samples by the reward.

The baseline every trained policy should beat at its KL: draw N samples per held-out prompt
and keep the one the reward model likes best. A run has no iterations (the config insists on
`iterations: 0`); after the initial policy's `iter_000/eval.json` the loop calls
`write_best_of_n`, which draws one pool of max(best_of_n.n) samples per eval prompt with the
run's sampling settings (`bon_samples.jsonl`, with their rewards; a rerun reuses it) and writes
`best_of_n.json`: per N, the best-of-N reward and KL (`alignment.best_of_n`).
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

from alignment.algorithms.base import Models
from alignment.best_of_n import summarize_best_of_n
from alignment.conditioning import Conditioning
from alignment.config import Config
from alignment.errors import UserError
from alignment.evaluation import EVAL_SEED_OFFSET, sample_and_score
from alignment.interfaces import Sampler, ScoreFn
from alignment.io import atomic_write
from alignment.prompts import PromptRow
from alignment.records import SampleRecord, load_samples, save_samples

SAMPLES = "bon_samples.jsonl"
RESULT = "best_of_n.json"


class BestOfN:
    """Nothing to learn and nothing to condition on; the loop runs no update for it."""

    conditioning: Conditioning | None = None
    samples_itself = False

    def __init__(
        self, config: Config, models: Models, accelerator: Accelerator, score: ScoreFn
    ) -> None:
        pass

    @staticmethod
    def conditioning_for(config: Config) -> Conditioning | None:
        return None

    def update(
        self, iteration: int, it_dir: Path, seed: int, prompts: list[PromptRow]
    ) -> list[dict]:
        raise RuntimeError("best-of-n trains nothing: its runs have iterations: 0")

    def save_state(self, folder: Path) -> None:
        pass

    def load_state(self, folder: Path) -> None:
        pass


def write_best_of_n(
    out: Path,
    sampler: Sampler,
    rows: list[PromptRow],
    score: ScoreFn,
    config: Config,
    accelerator: Accelerator,
) -> None:
    """`out/bon_samples.jsonl` (skipped when it exists), then `out/best_of_n.json`.

    On several processes `sampler` and `score` are the loop's sharded ones: every rank holds all
    the samples, and the main process writes both files."""
    if (out / RESULT).exists():
        return
    main = accelerator.is_main_process
    pool = max(config.best_of_n.n)
    samples_path = out / SAMPLES
    if not samples_path.exists():
        # the eval seed, as iter_000/eval.json: the same draws for every run of these prompts
        scored = sample_and_score(
            sampler, rows, score, None, pool, seed=config.seed + EVAL_SEED_OFFSET
        )
        drawn = []
        for i, row in enumerate(rows):
            part = slice(i * pool, (i + 1) * pool)
            drawn.append(
                SampleRecord(
                    prompt=row.prompt,
                    id=row.id,
                    generations=scored.completions[part],
                    rewards=scored.rewards[part],
                    finish_reasons=[g.finish_reason for g in scored.generations[part]],
                )
            )
        if main:
            save_samples(samples_path, drawn)
    accelerator.wait_for_everyone()
    records = load_samples(samples_path)
    if [(r.prompt, len(r.generations), r.rewards is not None) for r in records] != [
        (row.prompt, pool, True) for row in rows
    ]:
        raise UserError(
            f"{samples_path}: does not hold {pool} scored samples for each of the {len(rows)} "
            "eval prompts; delete it to draw them again"
        )
    result = {
        "policy": config.model.policy,
        "num_prompts": len(rows),
        "pool_size": pool,
        "samples_file": SAMPLES,
        "best_of_n": summarize_best_of_n(
            [r for record in records for r in record.rewards or []],
            [g for record in records for g in record.generations],
            pool,
            config.best_of_n.n,
        ),
    }
    if main:
        with atomic_write(out / RESULT) as handle:
            json.dump(result, handle, indent=1)
    accelerator.wait_for_everyone()
