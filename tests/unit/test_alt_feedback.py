"""alt-feedback's pure parts: feedback into records, counts, the exemplar rule, the text
conditioning it trains with, and its config section."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.algorithms.alt_feedback import choose_exemplar, feedback_counts, with_feedback
from alignment.conditioning import Conditioning
from alignment.config import load_config
from alignment.errors import UserError
from alignment.records import SampleRecord
from experiments.commands.train import build_feedback
from rewards.feedback import STEERLM_HH_TEXTS, Feedback, HFFeedback


def records() -> list[SampleRecord]:
    return [
        SampleRecord(prompt="P1", generations=["a", "b", "c"], rewards=[0.1, 0.2, 0.3]),
        SampleRecord(prompt="P2", generations=["d", "e"], rewards=[0.4, None]),
    ]


def test_feedback_is_stored_as_text_and_bucket_max_minus_score():
    judged = [Feedback("good", 3), None, Feedback("meh", 1), Feedback("bad", 0), None]
    out = with_feedback(records(), judged, max_score=3)
    assert [r.feedback for r in out] == [["good", None, "meh"], ["bad", None]]
    assert [r.quantiles for r in out] == [[0, None, 2], [3, None]]
    assert out[1].rewards == [0.4, None]  # the reward model's rewards stay
    # 5 generations, 2 without feedback; one each of scores 0, 1 and 3
    assert feedback_counts(out, 3) == {
        "generations": 5,
        "without_feedback": 2,
        "by_score": {"0": 1, "1": 1, "2": 0, "3": 1},
    }


def test_feedback_must_match_the_generations_and_the_score_range():
    with pytest.raises(ValueError, match="4 judgements"):
        with_feedback(records(), [None] * 4, 3)
    with pytest.raises(ValueError, match="outside"):
        with_feedback(records(), [Feedback("x", 4)] + [None] * 4, 3)


def _judged(*pairs: tuple[str, int]) -> list[SampleRecord]:
    record = SampleRecord(prompt="P", generations=[str(i) for i in range(len(pairs))])
    return with_feedback([record], [Feedback(t, s) for t, s in pairs], 3)


def test_exemplar_is_the_most_frequent_top_score_text():
    # "ok" is the most frequent text overall, but at score 2; at 3, "fine" twice beats "great"
    judged = _judged(("ok", 2), ("ok", 2), ("ok", 2), ("great", 3), ("fine", 3), ("fine", 3))
    assert choose_exemplar(judged) == "fine"


def test_exemplar_ties_go_to_the_shortest_then_alphabetical():
    assert choose_exemplar(_judged(("longer", 3), ("short", 3))) == "short"
    assert choose_exemplar(_judged(("bbb", 3), ("aaa", 3), ("cc", 2))) == "aaa"


def test_exemplar_falls_back_to_the_best_score_present():
    assert choose_exemplar(_judged(("two", 2), ("one", 1), ("one", 1))) == "two"
    record = SampleRecord(prompt="P", generations=["x"])
    with pytest.raises(UserError, match="no generation got usable feedback"):
        choose_exemplar(with_feedback([record], [None], 3))


def test_text_conditioning_per_item_and_its_round_trip(tmp_path, tiny_tokenizer):
    cond = Conditioning.feedback_texts("feedback: {feedback} input: ", ("Concise.",))
    assert cond.condition("P") == "feedback: Concise. input: P"  # sampling and evaluation
    assert cond.condition("P", 2, "Too long.") == "feedback: Too long. input: P"  # training
    cond.save(tmp_path)
    assert Conditioning.load(tmp_path, tiny_tokenizer) == cond
    with pytest.raises(ValueError, match="keyed by quantile"):
        Conditioning("text", ("Excellent. input: ",)).condition("P", 0, "x")
    with pytest.raises(ValueError, match="template"):
        Conditioning("text", ("x",), template="no placeholder")


def test_feedback_provider_section():
    config = load_config(None, ["algorithm=alt-feedback"])
    fp = config.feedback_provider
    assert (fp.kind, fp.model, fp.temperature, fp.api_key_env) == (
        "chat",
        "gpt-3.5-turbo-0125",
        0.0,
        "OPENAI_API_KEY",
    )
    assert fp.condition_template == "feedback: {feedback} input: "
    cats = load_config(
        None,
        [
            "algorithm=alt-feedback",
            "feedback_provider.parser=categories",
            "feedback_provider.prompt=x",
        ],
    )
    assert cats.feedback_provider.condition_template == "{feedback}.\n\n"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["feedback_provider.max_workers=0"], "feedback_provider.max_workers must be >= 1"),
        (["feedback_provider.timeout=0"], "feedback_provider.timeout must be > 0"),
        (
            ["feedback_provider.parser=categories", "feedback_provider.categories=[a, b]"],
            "feedback_provider.prompt is required with categories of your own",
        ),
        (["feedback_provider.kind=api"], "'feedback_provider.kind' must be one of"),
        (["feedback_provider.template=plain"], "must contain '{feedback}'"),
        (["feedback_provider.categories=[a, b]"], "need parser categories"),
        (
            [
                "feedback_provider.parser=steerlm",
                "feedback_provider.prompt=x",
                "feedback_provider.categories=[a, b]",
            ],
            "go together",
        ),
        (["pool.num_quantiles=4"], "not read by alt-feedback"),
    ],
)
def test_feedback_provider_errors_name_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, ["algorithm=alt-feedback", *overrides])


def test_feedback_provider_belongs_to_alt_feedback_only():
    with pytest.raises(UserError, match="'feedback_provider' belongs to alt-feedback"):
        load_config(None, ["feedback_provider.model=x"])


CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def test_published_alt_setups():
    lmu = load_config(CONFIGS / "tldr_gptj_alt_lmu.yaml")
    fp = lmu.feedback_provider
    assert lmu.algorithm == "alt-feedback" and lmu.data.samples_per_prompt == 20
    assert (fp.kind, fp.model, fp.temperature, fp.api_key_env, fp.parser) == (
        "chat",
        "gpt-3.5-turbo-0125",
        0.0,
        "OPENAI_API_KEY",
        "alt",
    )
    assert lmu.pool.num_samples_per_quantile == 2 and lmu.pool.drop_factor == 1.0
    rm = load_config(CONFIGS / "tldr_gptj_alt_rm.yaml")
    assert rm.algorithm == "alt-rm" and rm.data.samples_per_prompt == 96
    assert rm.feedback.phrases == ["Excellent.", "Good.", "Mediocre.", "Bad.", "Horrible."]
    assert rm.pool.num_quantiles == 5 and rm.train.kl_coef == 0.0


def test_build_feedback_from_the_section(tiny_model_dir):
    steer = load_config(
        None,
        [
            "algorithm=alt-feedback",
            "feedback_provider.parser=steerlm",
            "feedback_provider.prompt='{prompt} -> {completion}'",
        ],
    )
    built = build_feedback(steer)
    assert built.max_score == 3 and built.texts == tuple(STEERLM_HH_TEXTS.values())
    local = load_config(
        None,
        [
            "algorithm=alt-feedback",
            "feedback_provider.kind=hf",
            f"feedback_provider.model={tiny_model_dir}",
            "model.device=cpu",
        ],
    )
    built = build_feedback(local)
    assert isinstance(built.provider, HFFeedback) and (built.max_score, built.texts) == (3, None)
