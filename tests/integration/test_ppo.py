"""`algorithm: ppo` end to end on the toy task: it learns, trains its weights, resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from toy import TOY_OVERRIDES, count_e_words, run_overrides, write_toy_task

from alignment.config import load_config
from alignment.errors import UserError
from alignment.loop import run
from samplers import HFSampler

# On-policy sampling, the toy's short generations, and a step size the toy learns with in two
# iterations (measured: held-out reward 1.9 -> 3.5 -> 4.3 over three iterations).
PPO_OVERRIDES = [
    *TOY_OVERRIDES,
    "algorithm=ppo",
    "sampling.temperature=1.0",
    "sampling.top_p=1.0",
    "ppo.learning_rate=3e-3",
    "ppo.batch_size=100",
    "ppo.ppo_epochs=2",
    "ppo.unfrozen_layers_ratio=1.0",
    "ppo.freeze_embeddings=false",
    "ppo.cliprange_value=10",
]
# train.* configures the conditional trainer, a section ppo does not read.
PPO_OVERRIDES = [o for o in PPO_OVERRIDES if not o.startswith("train.")]


@pytest.fixture
def toy(tmp_path):
    return write_toy_task(tmp_path)


def ppo_config(out, toy, *extra):
    return load_config(None, [*PPO_OVERRIDES, *run_overrides(out, *toy), *extra])


def test_ppo_raises_the_toy_reward(tmp_path, toy):
    metrics = run(ppo_config(tmp_path / "run", toy, "iterations=2"), count_e_words, HFSampler)
    initial, final = metrics[0], metrics[-1]
    assert final["reward_mean"] > initial["reward_mean"] + 1.0
    assert final["reward_mean"] - initial["reward_mean"] > 3 * (
        final["reward_stderr"] + initial["reward_stderr"]
    )
    log = [json.loads(line) for line in (tmp_path / "run/iter_002/train_log.jsonl").open()]
    assert len(log) == 2 * 8  # 2 epochs of 800 episodes in minibatches of 100
    assert all(row["episodes"] == 800 and row["skipped_unscored"] == 0 for row in log)


SMALL = [
    "data.prompts_per_iteration=8",
    "data.samples_per_prompt=4",
    "ppo.batch_size=8",
    "ppo.unfrozen_layers_ratio=0.5",
    "ppo.freeze_embeddings=true",
    "ppo.kl_horizon=10",  # so the adaptive coefficient visibly moves (and must be restored)
    "eval.samples_per_prompt=2",
    "eval.greedy=false",
]


def test_two_iterations_train_and_resume_bit_exactly(tmp_path, toy):
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    run(ppo_config(unbroken, toy, *SMALL, "iterations=2"), count_e_words, HFSampler)
    run(ppo_config(resumed, toy, *SMALL, "iterations=1"), count_e_words, HFSampler)
    run(ppo_config(resumed, toy, *SMALL, "iterations=2"), count_e_words, HFSampler)  # resumes

    final = "checkpoints/iter_002"
    trained, initial = (
        load_file(unbroken / final / "model.safetensors"),
        load_file(toy[0] / "model.safetensors"),
    )
    top, bottom = "transformer.h.1.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.weight"
    assert not torch.equal(trained[top], initial[top])
    assert torch.equal(trained[bottom], initial[bottom])  # frozen bottom half
    assert torch.equal(trained["transformer.wte.weight"], initial["transformer.wte.weight"])
    for key, value in load_file(resumed / final / "model.safetensors").items():
        assert torch.equal(value, trained[key]), key
    state = f"{final}/training_state"
    heads = [load_file(d / state / "value_head.safetensors") for d in (unbroken, resumed)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    kl = [json.loads((d / state / "ppo_state.json").read_text()) for d in (unbroken, resumed)]
    assert kl[0] == kl[1] and kl[0]["kl_coef"] != 0.1
    for name in ["iter_002/train_log.jsonl", "metrics.jsonl"]:
        assert (unbroken / name).read_text() == (resumed / name).read_text(), name
    assert not (unbroken / final / "conditioning.json").exists()
    assert "_QUANTILE_TOKEN_" not in (unbroken / "iter_002/samples.jsonl").read_text()


def test_subtract_reference_shapes_training_rewards_only(tmp_path, toy):
    model_dir, prompts = toy
    labelled = tmp_path / "labelled.jsonl"
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    labelled.write_text("".join(json.dumps({**r, "label": "the end"}) + "\n" for r in rows))
    config = ppo_config(
        tmp_path / "run",
        (model_dir, labelled),
        *SMALL,
        "iterations=1",
        "reward.subtract_reference=true",
    )
    run(config, count_e_words, HFSampler)
    for line in (tmp_path / "run/iter_001/scored.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["reference_reward"] == 2.0  # "the end": two words with an e
        assert record["rewards"] == [r - 2.0 for r in record["raw_rewards"]]


def test_subtract_reference_needs_a_reference_for_every_prompt(tmp_path, toy):
    config = ppo_config(tmp_path / "run", toy, "reward.subtract_reference=true")
    with pytest.raises(UserError, match=rf"{toy[1]}: row \S+ has no reference summary"):
        run(config, count_e_words, HFSampler)
