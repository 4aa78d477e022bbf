"""The Quark loop end to end on a toy task: it learns, it writes its run, it resumes."""

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
import yaml
from safetensors.torch import load_file
from toy import TOY_OVERRIDES, count_e_words, write_toy_task

from alignment.conditioning import (
    Conditioning,
    condition_prompt,
    control_token_ids,
    quantile_token,
)
from alignment.config import SamplingConfig, load_config
from alignment.errors import UserError
from alignment.evaluation import heldout_fingerprint
from alignment.loop import run
from alignment.models import load_model_and_tokenizer
from alignment.prompts import load_prompts
from alignment.records import load_samples
from experiments.cli import main
from samplers import HFSampler

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.fixture
def toy(tmp_path):
    return write_toy_task(tmp_path)


def toy_config(tmp_path, toy, *extra):
    model_dir, prompts = toy
    return load_config(
        None,
        [
            *TOY_OVERRIDES,
            f"out_dir={tmp_path / 'run'}",
            f"model.policy={model_dir}",
            f"data.train_prompts={prompts}",
            *extra,
        ],
    )


def train_cli(tmp_path, toy, *extra):
    """`quark-alt train - ...` in-process on the toy task; returns the exit status."""
    model_dir, prompts = toy
    return main(
        [
            "train",
            "-",
            *TOY_OVERRIDES,
            f"out_dir={tmp_path / 'run'}",
            f"model.policy={model_dir}",
            f"data.train_prompts={prompts}",
            "reward.name=toy:count_e_words",
            *extra,
        ]
    )


def mean_reward(model_dir, prompts, control, placement="prefix"):
    model, tokenizer = load_model_and_tokenizer(str(model_dir), device="cpu")
    sampler = HFSampler(
        model, tokenizer, SamplingConfig(max_new_tokens=8, max_prompt_tokens=64, keep_tail_tokens=8)
    )
    texts = [condition_prompt(p, control, placement) for p in prompts]
    gens = [g.text for gs in sampler.sample(texts, 8, seed=123) for g in gs]
    return sum(count_e_words(None, gens)) / len(gens)


def test_quark_learns_the_toy_reward(tmp_path, toy):
    """The algorithm, not the plumbing: the best token beats the worst and the initial policy."""
    config = toy_config(tmp_path, toy)
    metrics = run(config, count_e_words, HFSampler)
    initial, final = metrics[0], metrics[-1]
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3]
    # Held-out prompts, sampled, conditioned on _QUANTILE_TOKEN_0_ (initial: unconditioned).
    assert final["reward_mean"] > initial["reward_mean"] + 1.0
    assert final["reward_mean"] - initial["reward_mean"] > 3 * (
        final["reward_stderr"] + initial["reward_stderr"]
    )
    held_out = [r.prompt for r in load_prompts(toy[1])][-8:]
    checkpoint = tmp_path / "run" / "checkpoints" / "iter_003"
    best = mean_reward(checkpoint, held_out, quantile_token(0))
    worst = mean_reward(checkpoint, held_out, quantile_token(4))
    assert best > worst + 1.0, (best, worst)


def test_run_directory_layout_and_rerun_is_a_no_op(tmp_path, toy):
    config = toy_config(
        tmp_path,
        toy,
        "iterations=1",
        "train.unfrozen_layers_ratio=0.5",
        "train.num_epochs=1",
        "eval.conditioning_curve=true",
    )
    run(config, count_e_words, HFSampler)
    out = tmp_path / "run"
    for name in [
        "config.yaml",
        "state.json",
        "metrics.jsonl",
        "iter_000/eval.json",
        "iter_001/samples.jsonl",
        "iter_001/scored.jsonl",
        "iter_001/pool.jsonl",
        "iter_001/train_log.jsonl",
        "iter_001/eval.json",
        "plots/reward_per_iteration.png",
        "plots/reward_by_quantile.png",
    ]:
        assert (out / name).is_file(), name
    assert "git_revision" in json.loads((out / "state.json").read_text())
    # the eval logs the conditioning curve, the held-out set and its generations; stage times
    assert "conditioning_curve" not in json.loads((out / "iter_000" / "eval.json").read_text())
    evaluated = json.loads((out / "iter_001" / "eval.json").read_text())
    curve = evaluated["conditioning_curve"]
    assert [c["control"] for c in curve["controls"]] == [quantile_token(q) for q in range(5)]
    saved = load_samples(out / "iter_001" / "eval_samples.jsonl")  # control 0's draws
    assert curve["controls"][0]["per_prompt_reward"] == pytest.approx(
        [sum(r.rewards) / len(r.rewards) for r in saved]
    )
    assert curve["best_minus_worst"]["n"] == len(saved) == 8
    assert evaluated["heldout"] == heldout_fingerprint(load_prompts(toy[1])[-8:])
    timing = json.loads((out / "iter_001" / "timing.json").read_text())
    assert set(timing) == {"sample", "score", "update", "eval", "conditioning_curve"}
    assert main(["report", str(out), "-o", str(tmp_path / "report.html")]) == 0
    checkpoint = out / "checkpoints" / "iter_001"
    card = (checkpoint / "README.md").read_text()
    assert "_QUANTILE_TOKEN_0_" in card and "quark-alt generate" in card
    trained, tokenizer = load_model_and_tokenizer(str(checkpoint), device="cpu")
    initial, _ = load_model_and_tokenizer(str(toy[0]), device="cpu")
    assert len(control_token_ids(tokenizer)) == 5
    # bottom block frozen, top block and embeddings trained
    assert torch.equal(
        trained.transformer.h[0].mlp.c_fc.weight, initial.transformer.h[0].mlp.c_fc.weight
    )
    assert not torch.equal(
        trained.transformer.h[1].mlp.c_fc.weight, initial.transformer.h[1].mlp.c_fc.weight
    )
    assert not torch.equal(trained.transformer.wte.weight[:100], initial.transformer.wte.weight)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.jsonl") if "iter_" in str(p)}
    run(config, count_e_words, HFSampler)  # same command again: nothing redone
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}


def test_tensorboard_tracker_gets_the_metrics(tmp_path, toy):
    config = toy_config(
        tmp_path, toy, "iterations=1", "train.num_epochs=1", "report_to=[tensorboard]"
    )
    run(config, count_e_words, HFSampler)
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_train_cli_prints_the_table(tmp_path, toy, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    rc = train_cli(
        tmp_path, toy, "iterations=1", "train.num_epochs=1", "eval.conditioning_curve=false"
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "reward (sampled)" in out and "ref ppl" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 2
    evaluated = json.loads((tmp_path / "run" / "iter_001" / "eval.json").read_text())
    assert "conditioning_curve" not in evaluated and "reward_mean" in evaluated  # switched off


def test_refuses_a_run_directory_of_another_config(tmp_path, toy, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    config = toy_config(
        tmp_path, toy, "iterations=1", "train.num_epochs=1", "reward.name=toy:count_e_words"
    )
    run(config, count_e_words, HFSampler)
    rc = train_cli(tmp_path, toy, "iterations=1", "train.num_epochs=1", "train.learning_rate=0.5")
    assert rc == 2
    assert "differs in: train.learning_rate" in capsys.readouterr().err


def test_resumes_a_run_saved_before_a_field_was_added(tmp_path, toy, monkeypatch):
    """A run started by older code has no line for a field added since: the field takes its
    default (the old behaviour), so the run resumes instead of being refused as another config."""
    monkeypatch.syspath_prepend(str(HERE))
    args = ("iterations=1", "train.num_epochs=1", "eval.conditioning_curve=false")
    run(toy_config(tmp_path, toy, *args), count_e_words, HFSampler)
    saved = tmp_path / "run" / "config.yaml"
    tree = yaml.safe_load(saved.read_text())
    del tree["train"]["batches_by_prompt"]  # as if the field did not exist when the run began
    saved.write_text(yaml.safe_dump(tree))
    run(toy_config(tmp_path, toy, *args), count_e_words, HFSampler)  # resumes: nothing to do
    tree["train"]["learning_rate"] = 0.5
    saved.write_text(yaml.safe_dump(tree))
    with pytest.raises(UserError, match="differs in: train.learning_rate"):
        run(toy_config(tmp_path, toy, *args), count_e_words, HFSampler)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.learning_rte=1"], "unknown key 'train.learning_rte'"),
        (["data.train_prompts=EMPTY"], "no usable prompt rows"),
        (["out_dir=BLOCKED/run"], "cannot write here"),
    ],
)
def test_bad_input_exits_2(tmp_path, toy, capsys, monkeypatch, extra, message):
    monkeypatch.syspath_prepend(str(HERE))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    extra = [e.replace("EMPTY", str(empty)).replace("BLOCKED", str(blocked)) for e in extra]
    rc = train_cli(tmp_path, toy, *extra)
    assert rc == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ crash and resume


def _train_command(out, toy, reward, *extra):
    model_dir, prompts = toy
    return [
        sys.executable,
        "-m",
        "experiments.cli",
        "train",
        "-",
        *TOY_OVERRIDES,
        "iterations=2",
        f"out_dir={out}",
        f"model.policy={model_dir}",
        f"data.train_prompts={prompts}",
        f"reward.name=toy:{reward}",
        *extra,
    ]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}


# Kill once this file appears (the stage after it is then running) during iteration 2.
KILL_WHEN = {
    "sampling": "checkpoints/iter_001",
    "scoring": "iter_002/samples.jsonl",
    "training": "iter_002/pool.jsonl",
}


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


@pytest.mark.parametrize(
    ("stage", "extra"),
    [
        *[(stage, ()) for stage in sorted(KILL_WHEN)],
        # one optimizer and schedule over the whole run: the rerun must restore its state
        ("training", ("train.reset_optimizer=false",)),
    ],
    ids=[*sorted(KILL_WHEN), "training-continued-optimizer"],
)
def test_sigkill_then_rerun_matches_an_unbroken_run(tmp_path, toy, stage, extra):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    command = _train_command(broken, toy, "slow_count_e_words", *extra)
    proc = subprocess.Popen(
        command, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = broken / KILL_WHEN[stage]
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (broken / "iter_002" / "eval.json").exists()
    subprocess.run(command, env=_env(), cwd=REPO, check=True, capture_output=True)
    subprocess.run(
        _train_command(unbroken, toy, "count_e_words", *extra),
        env=_env(),
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    for name in ["iter_001/pool.jsonl", "iter_002/pool.jsonl", "metrics.jsonl"]:
        assert (broken / name).read_text() == (unbroken / name).read_text(), name
    final = "checkpoints/iter_002"
    expected = _weights(unbroken / final)
    for key, value in _weights(broken / final).items():
        assert torch.equal(value, expected[key]), key
    rows = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert not list(broken.rglob(".*tmp*"))  # no half-written file left behind
    # only the newest checkpoint keeps the optimizer state it would resume from
    assert [p.parent.name for p in broken.glob("checkpoints/*/training_state")] == ["iter_002"]


def test_a_second_run_on_the_same_directory_is_refused_at_once(tmp_path, toy):
    out, lone = tmp_path / "run", tmp_path / "lone"
    command = _train_command(out, toy, "slow_count_e_words")
    first = subprocess.Popen(
        command, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (out / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.01)
    second = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 2
    assert f"in use by another run (pid {first.pid})" in second.stderr
    assert first.wait() == 0
    subprocess.run(_train_command(lone, toy, "count_e_words"), env=_env(), cwd=REPO, check=True)
    for name in ["iter_001/pool.jsonl", "iter_002/pool.jsonl", "metrics.jsonl"]:
        assert (out / name).read_text() == (lone / name).read_text(), name


def test_rft_trains_on_the_best_quantile_without_conditioning(tmp_path, toy):
    config = toy_config(tmp_path, toy, "algorithm=rft", "iterations=2", "train.num_epochs=1")
    metrics = run(config, count_e_words, HFSampler)
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "iter_002"
    trained, tokenizer = load_model_and_tokenizer(str(checkpoint), device="cpu")
    initial, _ = load_model_and_tokenizer(str(toy[0]), device="cpu")
    assert control_token_ids(tokenizer) == [] and not (checkpoint / "conditioning.json").exists()
    assert "plain causal LM" in (checkpoint / "README.md").read_text()
    assert not torch.equal(
        trained.transformer.h[1].mlp.c_fc.weight, initial.transformer.h[1].mlp.c_fc.weight
    )
    # 40 prompts x 2 best-quantile samples = 80 items at batch 64: 2 steps per iteration
    for iteration in (1, 2):
        assert (
            len((out / f"iter_{iteration:03d}" / "train_log.jsonl").read_text().splitlines()) == 2
        )
    # iteration 2 samples unconditioned: the stored generations never saw a control token
    assert "_QUANTILE_TOKEN_" not in (out / "iter_002" / "samples.jsonl").read_text()
    assert "conditioning_curve" not in json.loads((out / "iter_002" / "eval.json").read_text())


def test_alt_rm_conditions_on_feedback_text_without_new_tokens(tmp_path, toy):
    config = toy_config(
        tmp_path,
        toy,
        "algorithm=alt-rm",
        "iterations=2",
        "train.num_epochs=1",
        "eval.conditioning_curve=true",
    )
    run(config, count_e_words, HFSampler)
    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "iter_002"
    trained, tokenizer = load_model_and_tokenizer(str(checkpoint), device="cpu")
    initial, initial_tokenizer = load_model_and_tokenizer(str(toy[0]), device="cpu")
    assert len(tokenizer) == len(initial_tokenizer) and control_token_ids(tokenizer) == []
    assert not torch.equal(
        trained.transformer.h[1].mlp.c_fc.weight, initial.transformer.h[1].mlp.c_fc.weight
    )
    conditioning = Conditioning.load(checkpoint, tokenizer)
    assert conditioning is not None and conditioning.kind == "text"
    assert conditioning.condition("P") == "Excellent. input: P"
    # all 5 quantiles x 2 samples of 40 prompts train, each under its own phrase
    assert len((out / "iter_001" / "train_log.jsonl").read_text().splitlines()) == 7
    curve = json.loads((out / "iter_002" / "eval.json").read_text())["conditioning_curve"]
    assert curve["controls"][4]["control"] == "Horrible. input: "


def test_a_run_that_fails_at_start_up_does_not_claim_its_directory(
    tmp_path, toy, capsys, monkeypatch
):
    """A typo in the prompts path must not leave a config.yaml that refuses the fixed command."""
    monkeypatch.syspath_prepend(str(HERE))
    rc = train_cli(tmp_path, toy, "data.train_prompts=/no/such/prompts.jsonl", "iterations=1")
    assert rc == 2 and "no such file" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert train_cli(tmp_path, toy, "iterations=1", "train.num_epochs=1") == 0


def test_a_run_with_an_8bit_reference_measures_kl_against_it(tmp_path, toy):
    """`model.reference_quantization=8bit` on the CPU (bitsandbytes' CPU backend): the initial
    policy's KL, 0 against a full-precision copy of itself (its control tokens, never sampled,
    excluded), becomes the quantization's small error, and so does its reference perplexity."""
    results = []
    for name, extra in (("full", []), ("8bit", ["model.reference_quantization=8bit"])):
        small = ["iterations=1", "data.prompts_per_iteration=4", "data.samples_per_prompt=4"]
        small += ["train.num_epochs=1", "data.num_eval_prompts=4"]
        config = toy_config(tmp_path / name, toy, *small, *extra)
        results.append(run(config, count_e_words, HFSampler)[0])  # iteration 0: the initial policy
    full, quantized = results
    assert abs(full["kl"]) < 1e-5
    assert 1e-5 < abs(quantized["kl"]) < 0.05
    assert quantized["ref_perplexity"] == pytest.approx(full["ref_perplexity"], rel=0.05)
    assert quantized["ref_perplexity"] != full["ref_perplexity"]
