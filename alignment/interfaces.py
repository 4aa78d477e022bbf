"""What the algorithms need from a sampler, a reward and a feedback writer, and nothing more.

The loop and the trainers are written against these two shapes, so `samplers/` and `rewards/`
depend on `alignment` and never the other way round: a new backend (vLLM, an API reward) plugs in
without the training code importing it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from alignment.records import FinishReason


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: FinishReason  # "stop": ended by itself; "length": cut at max_new_tokens
    num_tokens: int


class Sampler(Protocol):
    def sample(
        self, prompts: Sequence[str], num_samples: int, *, seed: int, greedy: bool = False
    ) -> list[list[Generation]]:
        """Return `num_samples` generations for each prompt, in prompt order."""
        ...


ScoreFn = Callable[[Sequence[str], Sequence[str]], list[float | None]]
"""(raw prompts, completions) -> one reward per completion, None where it could not be scored."""


class Judgement(Protocol):
    """One parsed feedback: the text the policy is conditioned on, and its score (higher is
    better)."""

    @property
    def text(self) -> str: ...

    @property
    def score(self) -> int: ...


class FeedbackFn(Protocol):
    """What ALT-LMU / ALT-LMC / SteerLM learn from: a judgement of each generation.

    `max_score`: scores are integers in 0..max_score (ALT-LMU: 3). `texts`: for feedback from
    a closed set (ALT-LMC's categories, SteerLM's attribute strings), every text it can give,
    best first; None for free text, whose exemplar the algorithm picks from the replies.
    """

    max_score: int
    texts: tuple[str, ...] | None

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str]
    ) -> Sequence[Judgement | None]:
        """(raw prompts, completions) -> one judgement per pair, None where there is none."""
        ...
