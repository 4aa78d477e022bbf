"""Prompt sets: the rows a sampler is asked to continue.

Two layouts are understood, both TL;DR conventions: a ready `prompt` column (CarperAI, with the
human summary as `label`), or `subreddit`/`title`/`post`/`summary` (OpenAI / shared data), which
is turned into the CarperAI prompt text so both layouts give identical prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.errors import UserError
from alignment.io import read_jsonl

TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


@dataclass(frozen=True)
class PromptRow:
    id: str
    prompt: str
    reference: str | None = None


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    return TLDR_TEMPLATE.format(
        subreddit=subreddit.removeprefix("r/"), title=title.strip(), post=post.strip()
    )


def prompt_from_row(obj: dict[str, Any], where: str, index: int) -> PromptRow:
    """Build one PromptRow from a parsed row of either layout; errors name `where` and the field."""
    row_id = str(obj.get("id", index))
    if "prompt" in obj:
        prompt = obj["prompt"]
        reference = obj.get("label", obj.get("summary"))
    elif "post" in obj:
        for name in ("subreddit", "title", "post"):
            if not isinstance(obj.get(name), str):
                raise UserError(f"{where}: field '{name}' is missing or not a string")
        prompt = tldr_prompt(obj["subreddit"], obj["title"], obj["post"])
        reference = obj.get("summary")
    else:
        raise UserError(f"{where}: needs a 'prompt' field, or 'subreddit'/'title'/'post'")
    if not isinstance(prompt, str):
        raise UserError(f"{where}: field 'prompt' is not a string")
    if not prompt.strip():
        raise UserError(f"{where}: field 'prompt' is empty")
    return PromptRow(
        id=row_id, prompt=prompt, reference=reference if isinstance(reference, str) else None
    )


def truncate_middle(ids: list[int], max_tokens: int, keep_tail: int) -> list[int]:
    """Cut tokens from the middle so the prompt's head and its ending (`... TL;DR:`) both stay."""
    if len(ids) <= max_tokens:
        return ids
    tail = min(keep_tail, max_tokens // 2)
    return ids[: max_tokens - tail] + ids[len(ids) - tail :]


def load_prompts(path: str | Path, limit: int | None = None) -> list[PromptRow]:
    """Read a JSONL prompt set (either layout). An empty result is an error, not a silent no-op."""
    if limit is not None and limit < 1:
        raise UserError(f"{path}: the prompt limit must be >= 1, got {limit}")
    rows = [
        prompt_from_row(obj, f"{path}:{lineno}", i)
        for i, (lineno, obj) in enumerate(read_jsonl(path))
    ]
    if not rows:
        raise UserError(f"{path}: no usable prompt rows")
    return rows[:limit] if limit is not None else rows


def demo_prompts_path() -> Path:
    """The TL;DR-format demo set written for this project and shipped inside it."""
    return Path(__file__).resolve().parent.parent / "experiments" / "data" / "tldr_demo.jsonl"
