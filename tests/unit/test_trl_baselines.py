"""The parts of the trl baselines that need no trainer: the recording reward, the prompt draw."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alignment.algorithms.trl_baselines import GRPO, RecordingReward
from alignment.config import load_config
from alignment.errors import UserError
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


def test_ranks_recordings_absorb_into_the_main_ones_in_rank_order():
    rows = [PromptRow(id="a", prompt="p"), PromptRow(id="b", prompt="q")]
    ranks = [RecordingReward(lengths_or_none, rows, stop_ids=[EOS]) for _ in range(2)]
    # trl's split of one step: each rank gets one generation of each prompt
    ranks[0](prompts=["p", "q"], completions=["x", "bad"], completion_ids=[[EOS], [1]], row=[0, 1])
    ranks[1](prompts=["p", "q"], completions=["yy", "z"], completion_ids=[[1], [EOS]], row=[0, 1])
    ranks[0].absorb(ranks[1].recorded)
    a, b = ranks[0].records(iteration=1, per_prompt=2)
    assert a.generations == ["x", "yy"] and a.rewards == [1.0, 2.0]
    assert a.finish_reasons == ["stop", "length"]
    assert b.generations == ["bad", "z"] and b.rewards == [None, 1.0]


def test_a_step_that_does_not_split_evenly_over_the_processes_is_refused():
    settings = ["algorithm=grpo", "data.samples_per_prompt=8", "grpo.prompts_per_step=2"]
    config = load_config(None, [*settings, "grpo.batch_size=8"])
    models = SimpleNamespace(policy=SimpleNamespace(device=torch.device("cpu")))
    for processes in (1, 2):  # 2 prompts x 8 samples = 16 generations per step
        grpo = GRPO(config, models, SimpleNamespace(num_processes=processes), lengths_or_none)
        assert grpo._args(Path("unused"), seed=1).gradient_accumulation_steps == 2 // processes
    grpo = GRPO(config, models, SimpleNamespace(num_processes=4), lengths_or_none)
    with pytest.raises(UserError, match=r"grpo.batch_size \(8\) x 4 processes must divide"):
        grpo._args(Path("unused"), seed=1)


def test_iteration_prompts_are_seeded_and_capped():
    rows = [PromptRow(id=str(i), prompt=f"p{i}") for i in range(10)]
    drawn = iteration_prompts(rows, 4, seed=43)
    assert drawn == iteration_prompts(rows, 4, seed=43) and len(set(map(id, drawn))) == 4
    assert drawn != iteration_prompts(rows, 4, seed=44)
    assert sorted(r.id for r in iteration_prompts(rows, 99, seed=1)) == sorted(r.id for r in rows)
