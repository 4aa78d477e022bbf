"""Pure text functions behind the rewards: the TL;DR prompt split and surface statistics.

Kept apart from any model so each can be unit-tested on strings, and so the value-head reward
and the embedded reward read a TL;DR prompt the same way.
"""

from __future__ import annotations

import re

TLDR_MARKER = "TL;DR:"
_POST_LABEL = re.compile(r"(?:^|\n)POST:[ \t]*")
_WORD = re.compile(r"\w+")


def split_tldr(prompt: str, completion: str) -> tuple[str, str]:
    """(post part, summary) of a TL;DR prompt + completion, as the CarperAI reward model reads it.

    ALT concatenates prompt and generation and splits at "TL;DR:" (ALT `alt/models/reward.py`,
    `docs/algorithm.md` section 8); we split the prompt alone, at its last marker, so a marker
    inside the generation or an earlier "TL;DR:" inside the post cannot move the boundary. Text
    after the prompt's marker (normally none) belongs to the summary. A prompt without the marker is
    all post.

    Returns:
        (post part stripped, summary stripped): the post part keeps SUBREDDIT/TITLE/POST labels.
    """
    cut = prompt.rfind(TLDR_MARKER)
    if cut < 0:
        return prompt.strip(), completion.strip()
    head, tail = prompt[:cut], prompt[cut + len(TLDR_MARKER) :]
    return head.strip(), f"{tail.strip()} {completion.strip()}".strip()


def post_body(prompt: str) -> str:
    """The post text of a TL;DR prompt: after "POST:" and before the last "TL;DR:".

    Falls back to the whole text before the marker for prompts in another layout.
    """
    head, _ = split_tldr(prompt, "")
    match = _POST_LABEL.search(head)
    return head[match.end() :].strip() if match else head


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped): the unit of every statistic below."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def copy_rate(summary: str, source: str, n: int = 3) -> float:
    """Fraction of the summary's word n-grams that occur verbatim in the source, in [0, 1].

    1.0 for a pasted sentence, about 0.1 for a human TL;DR. 0.0 when the summary is shorter
    than n words (too short to call copying).
    """
    grams = _ngrams(words(summary), n)
    if not grams:
        return 0.0
    seen = set(_ngrams(words(source), n))
    return sum(g in seen for g in grams) / len(grams)


def distinct_ratio(text: str, n: int = 2) -> float:
    """Distinct word n-grams / all word n-grams, in (0, 1]; 1.0 for texts shorter than n words.

    Natural text of summary length scores about 0.99; a looped phrase scores near 1/len.
    """
    grams = _ngrams(words(text), n)
    return len(set(grams)) / len(grams) if grams else 1.0
