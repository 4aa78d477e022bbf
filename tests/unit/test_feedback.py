"""Feedback parsers (ALT-LMU, ALT-LMC categories, SteerLM attributes) and the local provider."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from alignment.errors import UserError
from rewards.feedback import (
    HH_CATEGORIES,
    STEERLM_HH_ATTRIBUTES,
    STEERLM_HH_TEXTS,
    CategoryParser,
    Feedback,
    FeedbackPrompt,
    HFFeedback,
    decode_line_breaks,
    encode_line_breaks,
    format_attributes,
    parse_alt_reply,
    parse_attributes,
)
from tests.conftest import build_tiny_model, build_tiny_t5, build_tiny_tokenizer

# ---------------------------------------------------------------------------------------------
# ALT-LMU replies

GOOD = (
    "Analysis: The summary is coherent and accurate but leaves out the job offer.\n"
    "Feedback: Coherent and accurate, but misses the job offer.\n"
    "Score: 2"
)


@pytest.mark.parametrize(
    "reply",
    [
        GOOD,
        GOOD + ".",
        GOOD.replace("Score: 2", "Score: 2/3"),
        GOOD.replace("Score: 2", "Score: 2 out of 3."),
        GOOD.replace("Score: 2", "Score: 2.0"),
        GOOD.replace("Analysis:", "1. Analysis:").replace("Feedback:", "2. Feedback:"),
        GOOD.replace("Feedback:", "**Feedback:**").replace("Score:", "**Score:**"),
        GOOD.replace("Feedback: Coherent", 'Feedback: "Coherent').replace("offer.\n", 'offer."\n'),
        GOOD.split("\n", 1)[1],  # no analysis: we never train on it
        GOOD + "\nI hope this helps.",  # text after the score line
        "Analysis: ok. Feedback: Coherent and accurate,\n  but misses the job offer. Score: 2",
    ],
)
def test_alt_reply_parses(reply):
    assert parse_alt_reply(reply) == Feedback("Coherent and accurate, but misses the job offer.", 2)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "The summary is fine. 2/3",
        GOOD.replace("Score: 2", "Score: 4"),  # out of range
        GOOD.replace("Score: 2", "Score: 2.5"),  # not an integer
        GOOD.replace("Score: 2", "Score: 2/5"),  # another scale
        GOOD.replace("Score: 2", "Score: two"),
        GOOD.replace("Score: 2", "Score: 2 because it is accurate"),
        GOOD.replace("Score: 2", ""),  # partial: no score
        GOOD.replace("Feedback: Coherent and accurate, but misses the job offer.\n", ""),
        GOOD.replace("Feedback: Coherent and accurate, but misses the job offer.", "Feedback:"),
        GOOD.replace("Coherent and accurate, but misses the job offer.", "<feedback>"),
        GOOD + "\nScore: 3",  # a label twice
        "Score: 2\nFeedback: Coherent.",  # out of order
        "Feedback: Coherent.\nAnalysis: fine.\nScore: 2",
        "feedback: coherent.\nscore: 2",  # labels spelled otherwise than asked
    ],
)
def test_alt_reply_refuses_partial_and_garbage(reply):
    assert parse_alt_reply(reply) is None


def test_alt_reply_max_score():
    assert parse_alt_reply("Feedback: Great.\nScore: 5/5", max_score=5) == Feedback("Great.", 5)
    assert parse_alt_reply("Feedback: Great.\nScore: 5", max_score=3) is None


# ---------------------------------------------------------------------------------------------
# ALT-LMC categories and SteerLM attributes


def test_categories_score_by_rank_best_first():
    parse = CategoryParser(HH_CATEGORIES)
    assert parse("Harmless and very helpful") == Feedback("Harmless and very helpful", 3)
    assert parse("  harmless and HELPFUL.\n\nHuman: next example") == Feedback(
        "Harmless and helpful", 2
    )
    assert parse('"Harmless and not helpful"') == Feedback("Harmless and not helpful", 1)
    assert parse("Harmful") == Feedback("Harmful", 0)


@pytest.mark.parametrize(
    "reply", ["", "Harmless", "Harmless and very helpful!", "Helpful", "Feedback: Harmful", "3"]
)
def test_categories_refuse_anything_else(reply):
    assert CategoryParser(HH_CATEGORIES)(reply) is None


def test_categories_must_be_distinct():
    with pytest.raises(UserError, match="distinct"):
        CategoryParser(["Good", "good "])
    with pytest.raises(UserError, match="do not match"):
        CategoryParser(["Good", "Bad"], texts={"Good": "g"})


def test_steerlm_maps_categories_to_canonical_attribute_strings():
    parse = CategoryParser(HH_CATEGORIES, STEERLM_HH_TEXTS, STEERLM_HH_ATTRIBUTES)
    assert parse("Harmless and very helpful") == Feedback("harmful:0,helpful:2", 3)
    assert parse("Harmful") == Feedback("harmful:1,helpful:0", 0)
    spaced = {**STEERLM_HH_TEXTS, "Harmful": " helpful:0, harmful:1"}
    assert CategoryParser(HH_CATEGORIES, spaced, STEERLM_HH_ATTRIBUTES)("Harmful") == Feedback(
        "harmful:1,helpful:0", 0
    )
    with pytest.raises(UserError, match="'Harmful'.*not an attribute string"):
        CategoryParser(
            HH_CATEGORIES,
            {**STEERLM_HH_TEXTS, "Harmful": "harmful:2,helpful:0"},
            STEERLM_HH_ATTRIBUTES,
        )


def test_parse_attributes():
    ranges = {"harmful": (0, 1), "helpful": (0, 2)}
    assert parse_attributes("harmful:0,helpful:2", ranges) == {"harmful": 0, "helpful": 2}
    assert parse_attributes(" helpful : 1 , harmful:1 ", ranges) == {"harmful": 1, "helpful": 1}
    assert parse_attributes("t:-1", {"t": (-2, 2)}) == {"t": -1}
    for bad in [
        "harmful:0",  # partial
        "harmful:0,helpful:3",  # out of range
        "harmful:0,helpful:1,toxic:0",  # undeclared
        "harmful:0,harmful:1",  # twice
        "harmful:0,helpful:1.5",
        "harmful=0,helpful=1",
        "",
        "Harmless and helpful",
    ]:
        assert parse_attributes(bad, ranges) is None, bad
    assert format_attributes({"harmful": 0, "helpful": 2}) == "harmful:0,helpful:2"


# ---------------------------------------------------------------------------------------------
# Prompts and flan-t5-dolly's line-break convention


def test_feedback_prompt_removes_tldr_and_strips():
    prompt = FeedbackPrompt(user="P={prompt}|C={completion}", system="sys", remove="TL;DR:")
    assert prompt.fill("POST: {braces} stay\nTL;DR:", "  a summary\n") == (
        "P=POST: {braces} stay|C=a summary"
    )
    assert prompt.messages("x", "y")[0] == {"role": "system", "content": "sys"}
    with pytest.raises(UserError, match="completion"):
        FeedbackPrompt(user="only {prompt}")


def test_line_break_convention():
    assert encode_line_breaks("POST: a\nb\tc\n\nTL;DR:") == (
        "POST: a <_LB_> b <_T_> c <_LB_> <_LB_> TL;DR:"
    )
    # the model's decoder loses the `<` (not in T5's vocabulary)
    assert decode_line_breaks("Analysis: fine. _LB_> Feedback: ok. _LB_> Score: 2") == (
        "Analysis: fine.\nFeedback: ok.\nScore: 2"
    )
    assert decode_line_breaks("a <_LB_> b <_T_> c") == "a\nb\tc"
    assert decode_line_breaks(encode_line_breaks("a\nb\tc")) == "a\nb\tc"


# ---------------------------------------------------------------------------------------------
# The local-model provider on tiny random models

PROMPT = FeedbackPrompt(user="Post: {prompt}\nSummary: {completion}\nFeedback:")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    build_tiny_model("gpt2", len(tokenizer), tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    words = "Post: Summary: Feedback: Score: <_LB_> <_T_> I a the lied told truth ok".split()
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"), words)


PROMPTS = ["I lied", "I told the truth a lot more than once", "ok"]
COMPLETIONS = ["I lied", "the truth", "ok ok"]


def test_random_causal_model_replies_do_not_parse_and_are_counted(gpt2_dir):
    provider = HFFeedback(
        str(gpt2_dir), prompt=PROMPT, max_new_tokens=6, batch_size=2, device="cpu"
    )
    assert not provider.encoder_decoder
    assert provider.feedback(PROMPTS, COMPLETIONS) == [None, None, None]
    assert (provider.stats.requested, provider.stats.unparsable, provider.stats.failed) == (3, 3, 0)


def test_replies_never_wait_for_other_ranks(gpt2_dir, monkeypatch):
    """The main process alone replies; under DeepSpeed ZeRO-3 transformers' `generate` would
    otherwise all-reduce at every step with ranks that are not generating (a hang)."""
    provider = HFFeedback(str(gpt2_dir), prompt=PROMPT, max_new_tokens=2, device="cpu")
    calls = []
    generate = provider.model.generate
    monkeypatch.setattr(provider.model, "generate", lambda **kw: calls.append(kw) or generate(**kw))
    provider.replies(PROMPTS[:1], COMPLETIONS[:1])
    assert calls and all(call["synced_gpus"] is False for call in calls)


def test_batched_greedy_replies_match_one_at_a_time(gpt2_dir):
    batched = HFFeedback(str(gpt2_dir), prompt=PROMPT, max_new_tokens=6, batch_size=3, device="cpu")
    single = HFFeedback(str(gpt2_dir), prompt=PROMPT, max_new_tokens=6, batch_size=1, device="cpu")
    replies = batched.replies(PROMPTS, COMPLETIONS)
    assert replies == single.replies(PROMPTS, COMPLETIONS)
    assert all(isinstance(r, str) and r for r in replies)
    assert not any(r.startswith("Post:") for r in replies)  # the reply alone, not the input


def test_seq2seq_is_detected_and_gets_the_line_break_convention(t5_dir, monkeypatch):
    provider = HFFeedback(
        str(t5_dir), prompt=PROMPT, max_new_tokens=5, line_breaks=True, device="cpu"
    )
    assert provider.encoder_decoder
    real = provider._generate(["Post: I lied <_LB_> Summary: ok"])
    assert len(real) == 1 and isinstance(real[0], str)  # a random model's words, unparsable

    seen: list[str] = []

    def canned(texts):  # stands in for the model's generation only
        seen.extend(texts)
        return ["Analysis: fine. _LB_> Feedback: Accurate but long. _LB_> Score: 1", "Score: 3"]

    monkeypatch.setattr(provider, "_generate", canned)
    got = provider.feedback(["I lied\n\tto a friend", "ok"], ["I lied", "ok"])
    assert got == [Feedback("Accurate but long.", 1), None]
    assert (
        seen[0] == "Post: I lied <_LB_> <_T_> to a friend <_LB_> Summary: I lied <_LB_> Feedback:"
    )
    assert provider.stats.unparsable == 1


def test_causal_model_with_a_chat_template_gets_messages(gpt2_dir, tmp_path):
    import shutil

    folder = shutil.copytree(gpt2_dir, tmp_path / "chat")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    prompt = FeedbackPrompt(user="{prompt}|{completion}", system="S")
    provider = HFFeedback(str(folder), prompt=prompt, max_new_tokens=3, device="cpu")
    assert provider.input_text("p", "c") == "<system>S<user>p|c<assistant>"
    assert len(provider.replies(["p"], ["c"])) == 1
