"""The parts of the trl baselines that need no trainer: the recording reward, the prompt draw."""

from __future__ import annotations

import pytest

from alignment.algorithms.trl_baselines import RecordingReward
from alignment.loop import iteration_prompts
from alignment.prompts import PromptRow

EOS, NEWLINE = 0, 7


def lengths_or_none(prompts, completions):
    return [None if c == "bad" else float(len(c)) for c in completions]


def test_recording_reward_keeps_what_trl_drew_per_prompt_with_raw_prompts():
    rows = [PromptRow(id="a", prompt="first raw"), PromptRow(id="b", prompt="second raw")]
    seen = []

    def score(prompts, completions):
        seen.extend(prompts)
        return lengths_or_none(prompts, completions)

    reward = RecordingReward(score, rows, stop_ids=[EOS, NEWLINE])
    # trl's call: one generation batch, grouped by prompt, with the dataset's `row` column
    out = reward(
        prompts=["cut 2", "cut 2", "cut 1", "cut 1"],
        completions=["xy", "bad", "z", "abc"],
        completion_ids=[[5, EOS], [5, 6], [NEWLINE], [1, 2, 3]],
        row=[1, 1, 0, 0],
        trainer_state=None,
    )
    assert out == [2.0, None, 1.0, 3.0]  # trl gets None as is (it reads it as NaN)
    assert seen == ["second raw", "second raw", "first raw", "first raw"]
    first, second = reward.records(iteration=3, per_prompt=2)
    assert (first.id, first.prompt, first.iteration) == ("a", "first raw", 3)
    assert first.generations == ["z", "abc"] and first.rewards == [1.0, 3.0]
    assert first.finish_reasons == ["stop", "length"]
    assert second.generations == ["xy", "bad"] and second.rewards == [2.0, None]
    assert second.finish_reasons == ["stop", "length"]
    assert second.to_json()["rewards"] == [2.0, None]


def test_recording_reward_refuses_a_budget_trl_did_not_draw():
    rows = [PromptRow(id="a", prompt="p"), PromptRow(id="b", prompt="q")]
    reward = RecordingReward(lengths_or_none, rows, stop_ids=[EOS])
    reward(prompts=["p", "p"], completions=["x", "y"], completion_ids=[[1], [2]], row=[0, 0])
    with pytest.raises(RuntimeError, match=r"trl drew \[2, 0\] generations per prompt"):
        reward.records(iteration=1, per_prompt=2)


def test_iteration_prompts_are_seeded_and_capped():
    rows = [PromptRow(id=str(i), prompt=f"p{i}") for i in range(10)]
    drawn = iteration_prompts(rows, 4, seed=43)
    assert drawn == iteration_prompts(rows, 4, seed=43) and len(set(map(id, drawn))) == 4
    assert drawn != iteration_prompts(rows, 4, seed=44)
    assert sorted(r.id for r in iteration_prompts(rows, 99, seed=1)) == sorted(r.id for r in rows)
