"""Seq2seq verbaliser rewards (Kaleido, FLIPPED) on a tiny random T5 built in-process."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration

from alignment.errors import UserError
from rewards import load_reward
from rewards.seq2seq import label_score, mean_target_loglik, parse_labels
from tests.conftest import build_tiny_t5

WORDS = (
    "[Valence]: [Relevance]: Action: Value: Right: Duty: Supports Opposes Either Yes No "
    "input: output: Honesty summarize the post TL;DR: I lied to my friend told truth a "
    "Write short summary of"
).split()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-t5")
    params = {"valence": "[Valence]: Action: ACTION VRD: TEXT"}
    return build_tiny_t5(folder, WORDS, task_specific_params=params)


def test_label_score_is_the_weighted_probability_of_the_label_words():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 1.0]])
    # row 0: uniform, P = 0.25 each -> 0.25 - 0.25 = 0; row 1: e^2, 1, 1, e
    expected_1 = (torch.e**2 - torch.e) / (torch.e**2 + 2 + torch.e)
    got = label_score(logits, [0, 3], [1.0, -1.0])
    assert torch.allclose(got, torch.tensor([0.0, expected_1]))


def test_mean_target_loglik_ignores_masked_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    ids, mask = torch.tensor([[0, 1, 1]]), torch.tensor([[1, 1, 0]])
    expected = (torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.1))) / 2
    assert torch.allclose(mean_target_loglik(logits, ids, mask), expected.reshape(1))


def test_parse_labels():
    assert parse_labels("Supports=1, Opposes=-1") == {"Supports": 1.0, "Opposes": -1.0}
    assert parse_labels({"Yes": 2}) == {"Yes": 2.0}
    with pytest.raises(UserError, match="WORD=WEIGHT"):
        parse_labels("Supports=high")


def _by_hand(folder, text: str) -> torch.Tensor:
    model = T5ForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=torch.tensor([[0]])).logits[0, 0], tokenizer


def test_kaleido_valence_equals_a_hand_computation(t5_dir):
    reward = load_reward(f"kaleido:{t5_dir}", value="Honesty", device="cpu")
    # the template comes from the checkpoint's task_specific_params, ACTION = the completion
    text = reward.render("summarize the post", "I lied to my friend")
    assert text == "[Valence]: Action: I lied to my friend Value: Honesty"
    logits, tokenizer = _by_hand(t5_dir, text)
    probs = logits.softmax(-1)
    supports, opposes = tokenizer.convert_tokens_to_ids(["Supports", "Opposes"])
    expected = float(probs[supports] - probs[opposes])
    scores = reward.score(["summarize the post"] * 2, ["I lied to my friend", "told truth"])
    assert scores[0] == pytest.approx(expected, abs=1e-6)
    assert scores[1] != pytest.approx(scores[0])  # the completion is what is judged


def test_kaleido_falls_back_to_the_published_template_and_takes_labels(t5_dir, tmp_path):
    reward = load_reward(
        f"kaleido:{t5_dir}", value="Honesty", task="relevance", vrd="Duty", labels="Yes=1"
    )
    assert reward.render("p", "told truth") == "[Relevance]:\tAction: told truth\tDuty: Honesty"
    with pytest.raises(UserError, match="vrd must be"):
        load_reward(f"kaleido:{t5_dir}", value="Honesty", vrd="Virtue")
    with pytest.raises(UserError, match="give the value"):
        load_reward(f"kaleido:{t5_dir}")
    with pytest.raises(UserError, match="not in its vocabulary"):
        load_reward(f"kaleido:{t5_dir}", value="Honesty", labels="Absolutely=1")


def test_flipped_is_the_mean_loglik_of_the_instruction(t5_dir):
    instruction = "Write a short summary of the post"
    reward = load_reward(f"flipped:{t5_dir}", instruction=instruction, device="cpu")
    model = T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(t5_dir)
    source = "input: the post TL;DR:\noutput: I lied"
    assert reward.render("the post TL;DR:", "I lied") == source
    labels = tokenizer(instruction, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=tokenizer(source, return_tensors="pt").input_ids, labels=labels).loss
    # T5's loss is the mean token NLL: the score is its negative
    (score,) = reward.score(["the post TL;DR:"], ["I lied"])
    assert score == pytest.approx(-float(loss), abs=1e-5)


def test_batched_scores_equal_one_at_a_time(t5_dir):
    reward = load_reward(f"seq2seq:{t5_dir}", template="{completion}", labels="Yes=1,No=-1")
    completions = ["I lied to my friend a a a a", "told truth", "Honesty", "the post"]
    batched = reward.score(["x"] * 4, completions)
    single = [reward.score(["x"], [c])[0] for c in completions]
    assert batched == pytest.approx(single, abs=1e-6)


def test_seq2seq_needs_one_scoring_mode(t5_dir):
    with pytest.raises(UserError, match="exactly one of labels"):
        load_reward(f"seq2seq:{t5_dir}", template="{completion}")
    with pytest.raises(UserError, match="options it takes"):
        load_reward(f"seq2seq:{t5_dir}", template="{completion}", target="x", colour="red")
