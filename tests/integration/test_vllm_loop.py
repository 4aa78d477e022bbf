"""The loop with `sampling.backend=vllm` on 2 processes: where vLLM is (`make test-vllm`)."""

import importlib.util
import json

import pytest
from launch import launch_2
from test_multiprocess import SETTINGS, train_2
from toy import count_e_words, run_overrides, write_toy_task

from alignment.records import load_samples
from experiments.cli import main

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vLLM: make test-vllm"
)


def test_vllm_loop_on_two_processes(tmp_path, monkeypatch):  # pragma: no cover
    """Each rank's own in-process engine samples its share of the prompts: every prompt once,
    the stage files whole, and the initial policy's greedy reward the transformers sampler's
    (the same weights, decoded greedily); the run ends cleanly although vLLM's engine destroys
    the process group it joined when it shuts down."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, per engine
    toy = write_toy_task(tmp_path, heads=2)  # vLLM's CPU attention takes heads of 32 and more
    one, two = tmp_path / "one", tmp_path / "two"
    settings = [*SETTINGS, "reward.name=toy:count_e_words"]
    assert main(["train", "-", *settings, *run_overrides(one, *toy)]) == 0
    launch_2(*train_2(two, toy, "count_e_words"), "sampling.backend=vllm", timeout=600)
    a, b = (load_samples(run / "iter_001" / "samples.jsonl") for run in (one, two))
    assert [r.id for r in b] == [r.id for r in a]  # every prompt once, in order
    assert all(len(r.generations) == 4 for r in b)
    for record in load_samples(two / "iter_001" / "scored.jsonl"):
        assert record.rewards == count_e_words(None, record.generations)
    evals = [json.loads((r / "iter_000" / "eval.json").read_text()) for r in (one, two)]
    assert evals[1]["greedy_reward_mean"] == evals[0]["greedy_reward_mean"]
    assert (two / "checkpoints" / "iter_001" / "model.safetensors").exists()
