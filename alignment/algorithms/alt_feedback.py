"""ALT with LLM feedback: ALT-LMU (free-text critiques), ALT-LMC (categories) and SteerLM.

Each iteration the loop samples and scores (the reward model's rewards stay, for evaluation and
the logs); this update asks the feedback writer about every generation, keeps the replies in the
stage file `feedback.jsonl`, and trains the conditional LM on `"feedback: <text> input: <prompt>"`
(ALT-LMU) or `"<category>.\n\n<prompt>"` (ALT-LMC, SteerLM with attribute strings): each item on
its own feedback. Sampling and evaluation from iteration 2 on use one exemplar feedback of the
best score, fixed once (`choose_exemplar`), saved in the training state and in conditioning.json.

The training set is the pool's balanced draw with the scores as buckets (bucket = max_score -
score, 0 = best): `pool.num_samples_per_quantile` per prompt and score (ALT: 2 per score 0..3,
8 per prompt). Unlike ALT, a score with too few generations is not refilled from the others
(ALT refills every shortfall from any unused generation in stored order, including replies
that matched no category on HH); generations without feedback never train.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from accelerate import Accelerator

from alignment.algorithms.base import Models
from alignment.algorithms.conditional import Quark
from alignment.conditioning import Conditioning
from alignment.config import Config
from alignment.errors import UserError
from alignment.interfaces import FeedbackFn, Judgement, ScoreFn
from alignment.io import atomic_write
from alignment.pool import DataPool
from alignment.prompts import PromptRow
from alignment.records import SampleRecord, load_samples, save_samples

log = logging.getLogger(__name__)

FEEDBACK_FILE = "feedback.jsonl"
FEEDBACK_STATS = "feedback_stats.json"
STATE_FILE = "alt_feedback.json"


def with_feedback(
    records: Sequence[SampleRecord], judgements: Sequence[Judgement | None], max_score: int
) -> list[SampleRecord]:
    """Copies of `records` with each generation's feedback text and bucket (max_score - score).

    `judgements` are flat, record-major; None (no usable reply) leaves both None. Scores are
    stored as buckets so the pool draws them like quantiles, and read back as max - bucket.
    """
    if len(judgements) != sum(len(r.generations) for r in records):
        raise ValueError(f"{len(judgements)} judgements for the records' generations")
    out, start = [], 0
    for record in records:
        mine = judgements[start : start + len(record.generations)]
        start += len(mine)
        for j in mine:
            if j is not None and not 0 <= j.score <= max_score:
                raise ValueError(f"feedback score {j.score} outside [0, {max_score}]")
        out.append(
            replace(
                record,
                feedback=[None if j is None else j.text for j in mine],
                quantiles=[None if j is None else max_score - j.score for j in mine],
            )
        )
    return out


def feedback_counts(records: Sequence[SampleRecord], max_score: int) -> dict:
    """How many generations got feedback of each score, and how many got none (no reply, or
    a reply that did not parse)."""
    buckets = [q for r in records for q in r.quantiles or [None] * len(r.generations)]
    return {
        "generations": len(buckets),
        "without_feedback": sum(q is None for q in buckets),
        "by_score": {
            str(score): sum(q == max_score - score for q in buckets)
            for score in range(max_score + 1)
        },
    }


def choose_exemplar(records: Sequence[SampleRecord]) -> str:
    """ALT-LMU's exemplar, a feedback of the best score; ALT does not say which, so: the most
    frequent feedback text of the best bucket present (ties: the shortest, then alphabetical).

    The best score present is normally the top one; a lower one is logged.
    """
    pairs = [
        (q, text)
        for r in records
        for q, text in zip(r.quantiles or [], r.feedback or [], strict=False)
        if q is not None and text is not None
    ]
    if not pairs:
        raise UserError("no generation got usable feedback: cannot choose an exemplar")
    best = min(q for q, _ in pairs)
    if best != 0:
        log.warning("no feedback of the top score: the exemplar has %d below it", best)
    counts = Counter(text for q, text in pairs if q == best)
    return min(counts, key=lambda text: (-counts[text], len(text), text))


class AltFeedback(Quark):
    """The conditional trainer on each generation's own LLM feedback (ALT-LMU / LMC / SteerLM)."""

    def __init__(
        self,
        config: Config,
        models: Models,
        accelerator: Accelerator,
        score: ScoreFn,
        feedback: FeedbackFn | None = None,
    ) -> None:
        if feedback is None:
            raise UserError(
                "algorithm alt-feedback needs a feedback writer (the feedback_provider section; "
                "`quark-alt train` builds it, alignment.loop.run takes it as `feedback=`)"
            )
        super().__init__(config, models, accelerator, score)
        self.feedback, self.max_score = feedback, feedback.max_score
        self.num_buckets = feedback.max_score + 1
        self.exemplar: str | None = None
        chosen = config.feedback_provider.exemplar
        if chosen is None and feedback.texts is not None:
            chosen = feedback.texts[0]
        if chosen is not None:
            self._fix_exemplar(chosen)

    @staticmethod
    def conditioning_for(config: Config) -> Conditioning | None:
        """None until the exemplar is fixed: plain text needs nothing added to the model, and
        iteration 1 samples (and iteration 0 evaluates) unconditioned anyway."""
        return None

    def _fix_exemplar(self, exemplar: str) -> None:
        """Condition sampling and evaluation on `exemplar` from now on (the trainer too)."""
        self.exemplar = exemplar
        others = tuple(t for t in self.feedback.texts or () if t != exemplar)
        self.conditioning = Conditioning.feedback_texts(
            self.config.feedback_provider.condition_template,
            (exemplar, *others),
            self.config.conditioning.placement,
        )
        self.trainer.conditioning = self.conditioning

    def update(
        self, iteration: int, it_dir: Path, seed: int, prompts: list[PromptRow]
    ) -> list[dict]:
        records = self._ask(it_dir)
        if self.exemplar is None:  # free text: iteration 1's replies (or a resumed run's)
            first = it_dir.parent / "iter_001" / FEEDBACK_FILE
            self._fix_exemplar(choose_exemplar(load_samples(first) if first.exists() else records))
            log.info("exemplar feedback: %r", self.exemplar)
        return super().update(iteration, it_dir, seed, prompts)

    def _ask(self, it_dir: Path) -> list[SampleRecord]:
        """The stage file `feedback.jsonl`: scored.jsonl with every generation's feedback.

        On several processes the main process alone asks (each generation once, one writer of
        the reply cache) while the others wait; every rank then reads the same file."""
        path = it_dir / FEEDBACK_FILE
        if not path.exists() and self.accelerator.is_main_process:
            records = load_samples(it_dir / "scored.jsonl")
            judgements = self.feedback(
                [r.prompt for r in records for _ in r.generations],
                [g for r in records for g in r.generations],
            )
            records = with_feedback(records, judgements, self.max_score)
            counts = feedback_counts(records, self.max_score)
            log.info("feedback: %s", counts)
            with atomic_write(it_dir / FEEDBACK_STATS) as handle:
                json.dump(counts, handle, indent=1)
            save_samples(path, records)
        self.accelerator.wait_for_everyone()
        return load_samples(path)

    def _add(self, pool: DataPool, it_dir: Path) -> None:
        """The buckets are the feedback scores (no re-ranking); no feedback, no bucket."""
        pool.add(load_samples(it_dir / FEEDBACK_FILE))

    def save_state(self, folder: Path) -> None:
        super().save_state(folder)
        if self.accelerator.is_main_process:  # the same exemplar on every rank
            with atomic_write(folder / STATE_FILE) as handle:
                json.dump({"exemplar": self.exemplar}, handle, indent=1)

    def load_state(self, folder: Path) -> None:
        super().load_state(folder)
        path = folder / STATE_FILE
        exemplar = json.loads(path.read_text())["exemplar"] if path.exists() else None
        if exemplar is not None and exemplar != self.exemplar:
            self._fix_exemplar(exemplar)
