"""Every configuration dataclass and its defaults: the one place where defaults live."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingConfig:
    """How generations are drawn (reference spec section 1: ALT trains with T 0.9, top_p 0.9)."""

    temperature: float = 0.9
    top_p: float = 0.9
    max_new_tokens: int = 64
    max_prompt_tokens: int = 512
    """Longer prompts are cut from the middle, keeping the head and the ending."""
    keep_tail_tokens: int = 64
    """How much of a prompt's ending survives a middle cut (it holds `TL;DR:`)."""
    prompt_batch_size: int = 8
    """Prompts prefilled together (each then decodes K samples)."""
    stop_at_newline: bool = False
    """Also stop at a newline: TL;DR summaries are one line; ALT stops at EOS only."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("sampling.temperature must be > 0 (use greedy decoding instead)")
        if not 0 < self.top_p <= 1:
            raise ValueError("sampling.top_p must be in (0, 1]")
        for name in (
            "max_new_tokens",
            "max_prompt_tokens",
            "keep_tail_tokens",
            "prompt_batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"sampling.{name} must be >= 1")
