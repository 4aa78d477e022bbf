"""Two processes (gloo on CPU) through the real `accelerate launch` CLI and the shipped DDP config.

The loop: every prompt sampled exactly once, the main process alone writes each stage, and the
files hold what a one-process run's hold (the samples themselves differ: each rank draws from its
own seed). The trainer: the same items trained on 2 processes give the one-process weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import train_shard
import yaml
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from toy import TOY_OVERRIDES, count_e_words, run_overrides, write_toy_task

from alignment.records import load_samples
from experiments.cli import main

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIGS = REPO / "experiments" / "accelerate"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}


def launch_2(*args: str) -> None:
    """`accelerate launch` with the shipped DDP config on 2 processes (on CPU: gloo)."""
    command = [*LAUNCH, "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2"]
    done = subprocess.run([*command, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_parse(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {t.value for t in DistributedType}
    assert f"--config_file experiments/accelerate/{path.name}" in path.read_text()


@pytest.mark.parametrize("lora", [False, True], ids=["top-blocks", "lora"])
def test_two_processes_train_as_one(tmp_path, lora):
    """Same items, same seed: the weights and logged losses equal the one-process run's. The
    shards differ in token count and the last batch leaves one rank empty."""
    train_shard.main(str(tmp_path / "one"), lora=lora)
    launch_2(str(HERE / "train_shard.py"), str(tmp_path / "two"), *(["lora"] if lora else []))
    histories = [json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two")]
    assert len(histories[0]) == len(histories[1]) == 6
    for a, b in zip(*histories, strict=True):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "nll", "entropy", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    weights = [load_file(tmp_path / d / "weights.safetensors") for d in ("one", "two")]
    for name, value in weights[0].items():
        assert (weights[1][name] - value).abs().max() < 1e-3, name


def test_loop_on_two_processes(tmp_path):
    """`quark-alt train` under accelerate: one iteration, each stage file written once and whole."""
    model_dir, prompts = write_toy_task(tmp_path)
    settings = [
        *TOY_OVERRIDES,
        "iterations=1",
        "data.prompts_per_iteration=9",
        "data.samples_per_prompt=4",
        "train.num_epochs=1",
        "train.batch_size=8",
        "eval.samples_per_prompt=2",
        "reward.name=toy:count_e_words",
    ]
    runs = {name: tmp_path / name for name in ("one", "two")}
    assert main(["train", "-", *settings, *run_overrides(runs["one"], model_dir, prompts)]) == 0
    launch_2(
        "-m",
        "experiments.cli",
        "train",
        "-",
        *settings,
        *run_overrides(runs["two"], model_dir, prompts),
    )
    one, two = (runs[n] / "iter_001" for n in ("one", "two"))
    assert (two / "pool.jsonl").exists() and (two / "train_log.jsonl").exists()
    for stage in ("samples.jsonl", "scored.jsonl"):
        a, b = load_samples(one / stage), load_samples(two / stage)
        assert [r.id for r in b] == [r.id for r in a], stage  # every prompt once, same order
        assert all(len(r.generations) == 4 for r in b)
    for record in load_samples(two / "scored.jsonl"):  # the gathered rewards are the samples'
        assert record.rewards == count_e_words(None, record.generations)
    ckpt = runs["two"] / "checkpoints" / "iter_001"
    assert (ckpt / "model.safetensors").exists()
    states = sorted(p.name for p in (ckpt / "training_state").glob("random_states_*"))
    assert states == ["random_states_0.pkl", "random_states_1.pkl"]
    evals = [json.loads((r / "iter_001" / "eval.json").read_text()) for r in runs.values()]
    assert evals[0]["heldout"] == evals[1]["heldout"]
    assert evals[1]["reward_n"] == evals[0]["reward_n"] == 8 * 2
    metrics = (runs["two"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["iteration"] for m in metrics] == [0, 1]
    assert not list(runs["two"].rglob(".*.tmp"))
