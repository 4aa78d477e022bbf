"""A pairwise LLM judge: which of two summaries of a post is better, asked in both orders.

LLM judges prefer whichever answer they are shown first (or second) often enough to swing a win
rate, so every pair is asked twice, A/B and then B/A, and a verdict counts only when both orders
agree: A wins only if it is preferred in both, and a disagreement is a tie.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rewards.base import check_pairs
from rewards.llm_client import ChatClient, Message, chat_messages, require_fields

log = logging.getLogger(__name__)

Outcome = Literal["win", "tie", "loss"]
# An outcome as the number a win rate averages (a tie is half a win).
OUTCOME_VALUE: dict[Outcome, float] = {"win": 1.0, "tie": 0.5, "loss": 0.0}

_PREFERRED = re.compile(r"^\W*Preferred:\W*(?:Summary\s*)?([12])\W*$", re.MULTILINE)


@dataclass(frozen=True)
class JudgePrompt:
    """The question, with `{prompt}`, `{first}` and `{second}`; the reply must end with one
    line `Preferred: 1` or `Preferred: 2` (`parse_preference`)."""

    user: str
    system: str | None = None

    def __post_init__(self) -> None:
        require_fields(self.user, ("prompt", "first", "second"), "judge prompt")

    def messages(self, prompt: str, first: str, second: str) -> list[Message]:
        text = self.user.format(prompt=prompt.strip(), first=first.strip(), second=second.strip())
        return chat_messages(text, self.system)


SUMMARY_JUDGE_PROMPT = JudgePrompt(
    system="You are a careful, impartial judge of summaries.",
    user=(
        "Which of the following summaries does a better job of summarizing the most important "
        "points of the post, without including unimportant or irrelevant details? A good "
        "summary is both precise and concise.\n\n"
        "Post:\n{prompt}\n\nSummary 1:\n{first}\n\nSummary 2:\n{second}\n\n"
        "First, compare the two summaries in one sentence. Then, on a line of its own, say "
        'which is better as "Preferred: 1" or "Preferred: 2". Answer in this format:\n'
        "Comparison: <one-sentence comparison>\nPreferred: <1 or 2>"
    ),
)


def parse_preference(reply: str) -> int | None:
    """1 or 2 from a single `Preferred: N` line (`Preferred: Summary 2` too); None if there is
    no such line, or more than one."""
    found = _PREFERRED.findall(reply)
    return int(found[0]) if len(found) == 1 else None


def combine_orders(first: int | None, second: int | None) -> Outcome | None:
    """A's outcome from the A/B reply (`first`) and the B/A reply (`second`).

    A is summary 1 in the first order and summary 2 in the second: A/B -> 1 and B/A -> 2 is a
    win, 2 then 1 a loss, a disagreement a tie; an unreadable reply in either order gives None.
    """
    if first is None or second is None:
        return None
    if first != second:
        return "win" if first == 1 else "loss"
    return "tie"


class PairwiseJudge:
    """Asks `client` to compare completions `a` and `b` of each prompt, in both orders.

    `compare` returns A's outcome per prompt (None when a reply failed or did not parse, counted
    in `unusable`); all 2n requests go through the client's pool and cache together.
    """

    def __init__(self, client: ChatClient, prompt: JudgePrompt = SUMMARY_JUDGE_PROMPT) -> None:
        self.client, self.prompt = client, prompt
        self.unusable = 0

    def compare(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
    ) -> list[Outcome | None]:
        check_pairs(prompts, a)
        check_pairs(prompts, b)
        triples = list(zip(prompts, a, b, strict=True))
        conversations = [self.prompt.messages(p, x, y) for p, x, y in triples]
        conversations += [self.prompt.messages(p, y, x) for p, x, y in triples]
        replies = self.client.chat(conversations)
        choices = [None if r is None else parse_preference(r) for r in replies]
        n = len(prompts)
        missing = sum(c is None for c in choices)
        self.unusable += missing
        if missing:
            log.warning("judge %s: %d of %d replies unusable", self.client.model, missing, 2 * n)
        return [combine_orders(choices[i], choices[n + i]) for i in range(n)]
