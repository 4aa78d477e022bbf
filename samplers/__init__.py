"""Samplers: draw K generations per prompt from a policy.

`Sampler` is the protocol the loop talks to; `HFSampler` (transformers, runs on CPU) is the
default backend.
"""

from __future__ import annotations

from collections.abc import Sequence
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


from samplers.hf import HFSampler  # noqa: E402  (re-export after the protocol it implements)

__all__ = ["Generation", "HFSampler", "Sampler"]
