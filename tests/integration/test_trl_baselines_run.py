"""GRPO and RLOO through trl, in the shared loop: budget, scored.jsonl, training, resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy import TOY_OVERRIDES, count_e_words, write_toy_task

from alignment.config import load_config
from alignment.loop import run
from alignment.records import load_samples
from samplers import HFSampler

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROMPTS, PER_PROMPT, PER_STEP = 8, 4, 4
# the toy task without the conditional trainer's section, small enough for seconds per iteration
OVERRIDES = [
    *(o for o in TOY_OVERRIDES if not o.startswith("train.")),
    "iterations=2",
    f"data.prompts_per_iteration={PROMPTS}",
    f"data.samples_per_prompt={PER_PROMPT}",
    "data.num_eval_prompts=2",
    "eval.samples_per_prompt=2",
]


def section(algorithm: str) -> list[str]:
    return [
        f"algorithm={algorithm}",
        f"{algorithm}.prompts_per_step={PER_STEP}",
        f"{algorithm}.batch_size=8",
        f"{algorithm}.learning_rate=1e-3",
    ]


def every_third_unscored(prompts, completions, **kwargs):
    """count_e_words, but None for every third completion: trl must train on, record None."""
    rewards = count_e_words(prompts, completions)
    return [None if i % 3 == 0 else r for i, r in enumerate(rewards)]


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_two_iterations_train_the_policy_and_record_what_trl_drew(tmp_path, algorithm):
    model_dir, prompts = write_toy_task(tmp_path)
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            *OVERRIDES,
            *section(algorithm),
            f"out_dir={out}",
            f"model.policy={model_dir}",
            f"data.train_prompts={prompts}",
        ],
    )
    metrics = run(config, every_third_unscored, HFSampler)
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    initial = load_file(model_dir / "model.safetensors")
    for iteration in (1, 2):
        it_dir = out / f"iter_{iteration:03d}"
        records = load_samples(it_dir / "scored.jsonl")
        # the sampling budget: every prompt of the iteration once, PER_PROMPT generations each
        assert len(records) == PROMPTS and len({r.prompt for r in records}) == PROMPTS
        assert all(len(r.generations) == PER_PROMPT for r in records)
        assert {r.iteration for r in records} == {iteration}
        for r in records:
            expected = count_e_words(None, r.generations)
            assert all(got in (None, want) for got, want in zip(r.rewards, expected, strict=True))
            assert set(r.finish_reasons) <= {"stop", "length"}
        assert None in [x for r in records for x in r.rewards]  # stored, not crashed on
        # one optimizer step per PER_STEP prompts, each logged
        steps = [json.loads(line) for line in (it_dir / "train_log.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2] and all("loss" in s for s in steps)
        assert not (it_dir / "samples.jsonl").exists() and not (it_dir / "trl").exists()
        trained = load_file(out / "checkpoints" / f"iter_{iteration:03d}" / "model.safetensors")
        assert not torch.equal(
            trained["transformer.h.1.mlp.c_fc.weight"], initial["transformer.h.1.mlp.c_fc.weight"]
        )
    # the KL to the reference (beta > 0 by default) was computed against our reference
    assert any(s["kl"] > 0 for s in steps)
    # iteration 2 started from iteration 1's weights: the two checkpoints differ
    first, second = (load_file(out / f"checkpoints/iter_00{i}/model.safetensors") for i in (1, 2))
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_a_killed_update_is_redone_on_rerun(tmp_path):
    model_dir, prompts = write_toy_task(tmp_path)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "experiments.cli",
        "train",
        "-",
        *OVERRIDES,
        *section("grpo"),
        f"out_dir={out}",
        f"model.policy={model_dir}",
        f"data.train_prompts={prompts}",
        "reward.name=toy:slow_count_e_words",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    proc = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # iteration 1 is checkpointed; iteration 2's update (or its evaluation first) is running
    deadline = time.time() + 240
    while not (out / "iter_001" / "eval.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "checkpoints" / "iter_002").exists()
    # what a kill mid-update can leave: trl's output folder and a half-written stage file
    (out / "iter_002" / "trl" / "checkpoint-1").mkdir(parents=True)
    (out / "iter_002" / ".scored.jsonl.tmp").write_text('{"prompt": "half')
    rerun = subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True, text=True)
    # trl's optimizer is new every iteration: nothing to restore, and nothing to warn about
    assert "restarts from scratch" not in rerun.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    records = load_samples(out / "iter_002" / "scored.jsonl")
    assert sum(len(r.generations) for r in records) == PROMPTS * PER_PROMPT
    assert not (out / "iter_002" / "trl").exists() and not list(out.rglob(".*tmp*"))
