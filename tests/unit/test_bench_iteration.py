"""`benchmarks/bench_iteration.py` keeps working as the loop's interfaces move.

A benchmark is not a test, but one that breaks silently costs a measuring session: this runs
every stage of it in-process on a tiny model (one post, 4 new tokens) and checks each writes
its figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_iteration

    return bench_iteration


def test_every_stage_runs_on_a_tiny_model(bench, tiny_model_dir, tmp_path):
    threads = torch.get_num_threads()
    demo = BENCHMARKS.parent / "experiments" / "data" / "tldr_demo.jsonl"
    common = ["--work-dir", str(tmp_path), "--data", str(demo), "--num-prompts", "1"]
    common += ["--max-prompt-tokens", "900", "--threads", "0", "--set"]
    common += [f"model.policy={tiny_model_dir}", "sampling.max_new_tokens=4"]
    common += ["sampling.max_prompt_tokens=900"]
    stages = ["sample:sampler", "score", "sample:generate"]
    stages += [f"train:{v}" for v in bench.TRAIN_VARIANTS]
    for stage in stages:
        assert bench.main(["--stage", stage, *common]) == 0
        result = json.loads((tmp_path / bench.stage_file(stage)).read_text())
        assert result["seconds"] > 0 and result["peak_rss_mb"] > 0, stage
        if stage.startswith("train:"):
            assert result["steps"] >= 1 and result["items"] >= 1, stage
    assert torch.get_num_threads() == threads  # --threads 0 leaves torch's setting alone
