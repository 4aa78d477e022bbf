"""`algorithm: best-of-n` end to end on the toy task: no training, best_of_n.json, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launch import launch_2
from toy import count_e_words, write_toy_task

from alignment.best_of_n import kl_bound
from experiments.cli import main

HERE = Path(__file__).resolve().parent
OVERRIDES = [
    "algorithm=best-of-n",
    "iterations=0",
    "model.device=cpu",
    "data.num_eval_prompts=5",
    "sampling.max_new_tokens=8",
    "sampling.max_prompt_tokens=64",
    "sampling.keep_tail_tokens=8",
    "eval.samples_per_prompt=2",
    "best_of_n.n=[1, 2, 4, 8]",
    "reward.name=toy:count_e_words",
]


def test_best_of_n_run_writes_its_report_and_reuses_its_samples(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    model_dir, prompts = write_toy_task(tmp_path)
    out = tmp_path / "run"
    argv = [
        "train",
        "-",
        *OVERRIDES,
        f"out_dir={out}",
        f"model.policy={model_dir}",
        f"data.train_prompts={prompts}",
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "best of N on 5 eval prompts" in stdout and "KL bound" in stdout
    assert (out / "iter_000" / "eval.json").exists() and not (out / "checkpoints").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    report = json.loads((out / "best_of_n.json").read_text())
    assert (report["num_prompts"], report["pool_size"]) == (5, 8)
    rows = report["best_of_n"]
    assert [r["n"] for r in rows] == [1, 2, 4, 8]
    for row in rows:
        assert row["samples"] == row["n"] * 5 and row["reward_prompts"] == 5
        assert row["kl_bound"] == pytest.approx(kl_bound(row["n"]))
        assert 0.0 <= row["kl_estimate"] <= row["kl_bound"] + 1e-12
        assert len(row["per_prompt_reward"]) == 5 and row["reward_stderr"] >= 0.0
    means = [r["reward_mean"] for r in rows]
    assert all(b >= a - 1e-12 for a, b in zip(means, means[1:], strict=False))
    # N = 1 is the mean of the pool, N = 8 its best, per prompt
    records = [json.loads(line) for line in (out / "bon_samples.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(len(r["generations"]) == 8 for r in records)
    assert rows[0]["per_prompt_reward"] == pytest.approx([sum(r["rewards"]) / 8 for r in records])
    assert rows[-1]["per_prompt_reward"] == pytest.approx([max(r["rewards"]) for r in records])
    # a rerun reuses the samples: with the report gone and the samples edited, the new report
    # follows the edited samples
    records[0]["rewards"] = [100.0] + records[0]["rewards"][1:]
    (out / "bon_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "best_of_n.json").unlink()
    assert main(argv) == 0
    again = json.loads((out / "best_of_n.json").read_text())["best_of_n"]
    assert again[-1]["per_prompt_reward"][0] == 100.0


def test_best_of_n_on_two_processes_writes_one_whole_report(tmp_path):
    """The ranks sample and score their shares of the pool; the main process writes it whole."""
    model_dir, prompts = write_toy_task(tmp_path)
    out = tmp_path / "run"
    run_dir = [f"out_dir={out}", f"model.policy={model_dir}", f"data.train_prompts={prompts}"]
    launch_2("-m", "experiments.cli", "train", "-", *OVERRIDES, *run_dir)
    records = [json.loads(line) for line in (out / "bon_samples.jsonl").read_text().splitlines()]
    assert len(records) == 5 and all(len(r["generations"]) == 8 for r in records)
    for record in records:
        assert record["rewards"] == count_e_words(None, record["generations"])
    rows = json.loads((out / "best_of_n.json").read_text())["best_of_n"]
    assert rows[-1]["per_prompt_reward"] == pytest.approx([max(r["rewards"]) for r in records])
    assert not list(out.rglob(".*.tmp"))
