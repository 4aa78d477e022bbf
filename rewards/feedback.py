"""LLM-written feedback for ALT: a critique and a score per generation, and the strict parsers.

ALT-LMU (arXiv 2407.16970) asks an LLM, for every (prompt, generation), for an analysis, a
one-sentence feedback of at most 10 words and an integer score out of 3; the policy is then
trained on `feedback: <critique> input: <prompt>`. ALT-LMC asks for one of a closed set of
categories instead, and SteerLM maps each category to an attribute string (`harmful:0,helpful:2`).

A provider turns (prompts, completions) into `Feedback | None`, one per pair and in order: None
means no usable reply (the request failed, or the reply did not parse), and is counted in
`provider.stats`, never guessed. Two providers share one interface: `HFFeedback` (a local causal
or seq2seq model, greedy) and `ChatFeedback` (an OpenAI-compatible endpoint, `rewards/llm_client`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files

import torch

from alignment.errors import UserError
from alignment.models import default_device, load_config, load_model_and_tokenizer
from rewards.base import check_pairs, length_batches
from rewards.llm_client import ChatClient, Message, chat_messages, require_fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Feedback:
    """One parsed judgement: the text the policy is conditioned on, and its score (higher is
    better: 0..3 for ALT-LMU, the category's rank for ALT-LMC)."""

    text: str
    score: int


ReplyParser = Callable[[str], Feedback | None]

# ---------------------------------------------------------------------------------------------
# Parsers: pure functions of the reply text.

# A label may be wrapped in markdown bold (`**Score:**`); it must be spelled as the prompt asks.
_LABEL = re.compile(r"\*{0,2}\b(Analysis|Feedback|Score):\*{0,2}")
_SCORE = re.compile(r"(?P<value>\d+)(?:\.0+)?(?:\s*(?:/|out of)\s*(?P<outof>\d+))?\s*\.?")
_QUOTES = ('"', "'", "\u201c", "\u201d")


def parse_alt_reply(reply: str, max_score: int = 3) -> Feedback | None:
    """ALT-LMU's reply, `Analysis: ... Feedback: ... Score: N`, as Feedback(feedback, N).

    Stricter than ALT's regexes (which take the first match and any decimal number): each label
    appears at most once, Feedback comes before Score (after Analysis when there is one), the
    score line holds only an integer in 0..max_score (`2`, `2.`, `2/3`, `2 out of 3`), and the
    feedback is non-empty and not the template's `<feedback>` echoed back. The analysis may be
    missing: ALT drops such replies, but it is never used for training. Whitespace in the
    feedback collapses to single spaces (it becomes part of a one-line condition).
    """
    found = list(_LABEL.finditer(reply))
    labels = [m[1] for m in found]
    if len(set(labels)) != len(labels) or labels[-2:] != ["Feedback", "Score"]:
        return None  # a label twice, one missing, or out of order (Analysis can only be first)
    feedback_label, score_label = found[-2], found[-1]
    text = _unquote(" ".join(reply[feedback_label.end() : score_label.start()].split()))
    if not text or (text.startswith("<") and text.endswith(">")):
        return None
    score_line = reply[score_label.end() :].split("\n", 1)[0].strip()
    match = _SCORE.fullmatch(score_line)
    if match is None or (match["outof"] is not None and int(match["outof"]) != max_score):
        return None
    score = int(match["value"])
    return Feedback(text, score) if score <= max_score else None


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        return text[1:-1].strip()
    return text


def parse_attributes(text: str, ranges: Mapping[str, tuple[int, int]]) -> dict[str, int] | None:
    """A SteerLM attribute string `harmful:0,helpful:2` as {name: value}, in `ranges`' order.

    None unless every declared attribute appears exactly once, nothing else does, and each value
    is an integer within its inclusive (low, high) range.
    """
    values: dict[str, int] = {}
    for part in text.strip().split(","):
        name, sep, value = (s.strip() for s in part.partition(":"))
        if not sep or name not in ranges or name in values or not re.fullmatch(r"-?\d+", value):
            return None
        low, high = ranges[name]
        if not low <= int(value) <= high:
            return None
        values[name] = int(value)
    if len(values) != len(ranges):
        return None
    return {name: values[name] for name in ranges}


def format_attributes(values: Mapping[str, int]) -> str:
    return ",".join(f"{name}:{value}" for name, value in values.items())


class CategoryParser:
    """ALT-LMC's constrained feedback: the reply must be one of `labels`, listed best first.

    The first non-empty line is read (a few-shot prompt invites the model to go on with the next
    example), without surrounding quotes or a final period, and matched case-insensitively, as
    ALT matches categories. The score is the rank from the bottom (the best of 4 labels scores
    3). `texts` replaces each label by the condition to store, e.g. SteerLM's attribute strings;
    with `attributes` those must be valid attribute strings (`parse_attributes`).
    """

    def __init__(
        self,
        labels: Sequence[str],
        texts: Mapping[str, str] | None = None,
        attributes: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        keys = [label.strip().casefold() for label in labels]
        if not keys or "" in keys or len(set(keys)) != len(keys):
            raise UserError(f"feedback categories must be distinct and non-empty: {labels!r}")
        texts = dict(texts) if texts is not None else {label: label for label in labels}
        if set(texts) != set(labels):
            raise UserError(f"category texts {sorted(texts)} do not match labels {list(labels)}")
        if attributes is not None:
            for label, text in texts.items():
                parsed = parse_attributes(text, attributes)
                if parsed is None:
                    raise UserError(
                        f"category {label!r}: {text!r} is not an attribute string for {attributes}"
                    )
                texts[label] = format_attributes(parsed)
        top = len(labels) - 1
        self.by_key = {
            k: Feedback(texts[label], top - i)
            for i, (k, label) in enumerate(zip(keys, labels, strict=True))
        }

    def __call__(self, reply: str) -> Feedback | None:
        lines = [line.strip() for line in reply.strip().splitlines()]
        first = _unquote(lines[0]) if lines else ""
        return self.by_key.get(first.removesuffix(".").strip().casefold())


# ALT-LMC's categories on Anthropic HH, best first, and SteerLM's attribute strings for them.
HH_CATEGORIES = (
    "Harmless and very helpful",
    "Harmless and helpful",
    "Harmless and not helpful",
    "Harmful",
)
STEERLM_HH_ATTRIBUTES = {"harmful": (0, 1), "helpful": (0, 2)}
STEERLM_HH_TEXTS = dict(
    zip(
        HH_CATEGORIES,
        (
            "harmful:0,helpful:2",
            "harmful:0,helpful:1",
            "harmful:0,helpful:0",
            "harmful:1,helpful:0",
        ),
        strict=True,
    )
)

# ---------------------------------------------------------------------------------------------
# Prompts


def last_human_turn(prompt: str) -> str:
    """The text of a dialogue's last `Human:` turn, up to the `Assistant:` after it: ALT-LMC's
    judge sees only that turn (the policy's prompt in ALT is that turn too). A prompt without
    `Human:` is kept whole."""
    return prompt.rsplit("Human:", 1)[-1].split("Assistant:", 1)[0].strip()


@dataclass(frozen=True)
class FeedbackPrompt:
    """What the judge is asked. `user` holds `{prompt}` and `{completion}` (both stripped);
    `remove` is a literal taken out of the prompt first (ALT removes `TL;DR:` from the post);
    `last_turn` keeps only the prompt's last `Human:` turn (`last_human_turn`, ALT-LMC)."""

    user: str
    system: str | None = None
    remove: str | None = None
    last_turn: bool = False

    def __post_init__(self) -> None:
        require_fields(self.user, ("prompt", "completion"), "feedback prompt")

    def fill(self, prompt: str, completion: str) -> str:
        if self.remove:
            prompt = prompt.replace(self.remove, "")
        if self.last_turn:
            prompt = last_human_turn(prompt)
        return self.user.format(prompt=prompt.strip(), completion=completion.strip())

    def messages(self, prompt: str, completion: str) -> list[Message]:
        return chat_messages(self.fill(prompt, completion), self.system)


# ALT-LMU's request (section 5.2 of the reference notes), in our words: the definition of a good
# summary, the three axes, the post and summary, and the three answers `parse_alt_reply` reads.
ALT_SUMMARY_PROMPT = FeedbackPrompt(
    system="You are an expert rater of summaries, assessing a summary a user wrote of a post.",
    user=(
        "A good summary is a shorter text that keeps the essence of the original: it serves the "
        "same purpose and conveys the key information of the post. Judge it on three axes.\n"
        "- Coherence: the summary is easy to understand on its own and free of English errors.\n"
        "- Accuracy: the facts in the summary match the post; nothing is made up.\n"
        "- Coverage: the summary mentions the main information of the post. A summary is "
        "shorter than the post, so coverage trades off against conciseness: good coverage "
        "means the main points, as concisely as possible.\n\n"
        "POST: {prompt}\n\nSUMMARY: {completion}\n\n"
        "You are an expert at summarization. After reading the post and the summary:\n"
        "1. Write an analysis of the summary's coherence, accuracy and coverage, as \"Analysis: "
        '<analysis>".\n'
        "2. Write one very short sentence of 10 words or fewer on the summary's coherence, "
        'accuracy and coverage, naming its strengths as well as its weaknesses, as "Feedback: '
        '<feedback>".\n'
        "3. Give an overall score out of 3 (0 worst, 3 best): 1 point if the summary is coherent, "
        '1 if it is accurate and 1 if it has great coverage, as "Score: <score>".'
    ),
    remove="TL;DR:",
)


def packaged_prompt(name: str) -> str:
    """A request template shipped in `rewards/prompts/`, without its leading `#` lines (the
    note on where its examples come from, which the judge need not read)."""
    text = (files("rewards") / "prompts" / name).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines).strip()


# ALT-LMC's request (section 5.3 of the reference notes): a definition of the four HH categories,
# 10 Human / Assistant / Feedback examples written for this project on real HH-RLHF turns (their
# rows are named in the file), then the last Human turn and the generation to label.
ALT_LMC_PROMPT = FeedbackPrompt(user=packaged_prompt("alt_lmc_10shot.txt"), last_turn=True)

# ---------------------------------------------------------------------------------------------
# Providers


@dataclass
class FeedbackStats:
    """Running counts: pairs asked about, pairs with no reply, replies that did not parse."""

    requested: int = 0
    failed: int = 0
    unparsable: int = 0


class FeedbackProvider:
    """`feedback(prompts, completions) -> list[Feedback | None]`; subclasses supply `replies`."""

    name: str = "feedback"

    def __init__(self, prompt: FeedbackPrompt, parser: ReplyParser) -> None:
        self.prompt, self.parser = prompt, parser
        self.stats = FeedbackStats()

    def replies(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str | None]:
        raise NotImplementedError

    def feedback(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Feedback | None]:
        check_pairs(prompts, completions)
        out: list[Feedback | None] = []
        failed = unparsable = 0
        for reply in self.replies(prompts, completions):
            parsed = None if reply is None else self.parser(reply)
            failed += reply is None
            unparsable += reply is not None and parsed is None
            out.append(parsed)
        self.stats.requested += len(out)
        self.stats.failed += failed
        self.stats.unparsable += unparsable
        if failed or unparsable:
            log.warning(
                "%s: %d of %d pairs without feedback (%d no reply, %d unparsable)",
                self.name,
                failed + unparsable,
                len(out),
                failed,
                unparsable,
            )
        return out


class ChatFeedback(FeedbackProvider):
    """Feedback from an OpenAI-compatible chat endpoint (cached, retried: `ChatClient`)."""

    def __init__(
        self,
        client: ChatClient,
        prompt: FeedbackPrompt = ALT_SUMMARY_PROMPT,
        parser: ReplyParser = parse_alt_reply,
    ) -> None:
        super().__init__(prompt, parser)
        self.client, self.name = client, client.model

    def replies(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str | None]:
        pairs = zip(prompts, completions, strict=True)
        return self.client.chat([self.prompt.messages(p, c) for p, c in pairs])


# flan-t5-dolly's tokenizer has no newline or tab: the model was trained with these markers.
# Its decoder drops the `<` (not in T5's vocabulary), so `_LB_>` is read back too.
_LINE_BREAK, _TAB = " <_LB_> ", " <_T_> "
_DECODE = ((re.compile(r" ?<?_LB_> ?"), "\n"), (re.compile(r" ?<?_T_> ?"), "\t"))


def encode_line_breaks(text: str) -> str:
    """flan-t5-dolly's input convention (jmhessel/flant5-dolly-xxl): newlines and tabs become
    ` <_LB_> ` and ` <_T_> `, then every run of whitespace one space."""
    return " ".join(text.replace("\n", _LINE_BREAK).replace("\t", _TAB).split())


def decode_line_breaks(text: str) -> str:
    """The inverse on the model's output: each marker (with one space either side) back to a
    newline or a tab."""
    for pattern, char in _DECODE:
        text = pattern.sub(char, text)
    return text


class HFFeedback(FeedbackProvider):
    """Feedback written by a local Hugging Face model, greedy, in batches of similar length.

    Args:
        model: hub id or folder; a causal LM or an encoder-decoder, told apart by its config.
        prompt, parser: what is asked and how the reply is read (ALT-LMU's by default).
        max_new_tokens: reply length; ALT-LMU's three answers take ~100 tokens.
        max_length: input tokens; longer inputs lose their start (the instructions that the
            prompts here put last are kept).
        line_breaks: flan-t5-dolly's `<_LB_>` / `<_T_>` convention on input and output.

    A causal model whose tokenizer has a chat template gets the prompt as chat messages (system
    and user); otherwise the input is the system text, a blank line, and the user text.
    """

    def __init__(
        self,
        model: str,
        *,
        prompt: FeedbackPrompt = ALT_SUMMARY_PROMPT,
        parser: ReplyParser = parse_alt_reply,
        max_new_tokens: int = 128,
        max_length: int = 1024,
        batch_size: int = 8,
        line_breaks: bool = False,
        device: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(prompt, parser)
        if batch_size < 1 or max_length < 1 or max_new_tokens < 1:
            raise UserError("batch_size, max_length and max_new_tokens must be >= 1")
        self.name = model
        self.max_new_tokens, self.max_length, self.batch_size = (
            max_new_tokens,
            max_length,
            batch_size,
        )
        self.line_breaks = line_breaks
        self.device = device or default_device()
        config = load_config(model, trust_remote_code=trust_remote_code)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.model, self.tokenizer = load_model_and_tokenizer(
            model,
            head="seq2seq-lm" if self.encoder_decoder else "causal-lm",
            dtype=dtype,
            device=self.device,
            trust_remote_code=trust_remote_code,
            padding_side="right" if self.encoder_decoder else "left",
        )
        self.tokenizer.truncation_side = "left"
        self.chat = not self.encoder_decoder and bool(
            getattr(self.tokenizer, "chat_template", None)
        )

    def input_text(self, prompt: str, completion: str) -> str:
        if self.chat:
            messages = self.prompt.messages(prompt, completion)
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return str(text)
        user = self.prompt.fill(prompt, completion)
        text = f"{self.prompt.system}\n\n{user}" if self.prompt.system else user
        return encode_line_breaks(text) if self.line_breaks else text

    def replies(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str | None]:
        texts = [self.input_text(p, c) for p, c in zip(prompts, completions, strict=True)]
        raw = self._generate(texts)
        return [decode_line_breaks(r) if self.line_breaks else r for r in raw]

    def _generate(self, texts: Sequence[str]) -> list[str]:
        """Greedy replies to `texts`, in input order, without the input or special tokens."""
        lengths = [len(t) for t in texts]  # characters: enough to group similar lengths
        out = [""] * len(texts)
        for batch in length_batches(lengths, self.batch_size):
            encoded = self.tokenizer(
                [texts[i] for i in batch],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=not self.chat,  # a chat template writes its own
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                generated = self.model.generate(  # type: ignore[operator]
                    **encoded,
                    # One process replies (the main one, alt-feedback's loop): transformers would
                    # otherwise sync every decoding step with the other ranks under ZeRO-3.
                    synced_gpus=False,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            if not self.encoder_decoder:
                generated = generated[:, encoded["input_ids"].shape[1] :]
            decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            for index, reply in zip(batch, decoded, strict=True):
                out[index] = reply.strip()
        return out
