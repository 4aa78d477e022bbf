"""What the algorithms need from a sampler and a reward, and nothing more.

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
