"""Two processes (gloo on CPU) through the real `accelerate launch` CLI and the shipped configs
(DDP; FSDP 2 and DeepSpeed forced on by `sharded_cpu`, accelerate enabling them only with GPUs).

The loop: every prompt sampled exactly once, the main process alone writes each stage, and the
files hold what a one-process run's hold (the samples themselves differ: each rank draws from its
own seed), and a rank killed mid-iteration costs nothing once the command is rerun. The
trainer (top blocks or LoRA, under each engine): the same items trained on 2 processes give the
one-process weights.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import ppo_shard
import psutil
import pytest
import torch
import train_shard
import yaml
from accelerate.utils import DistributedType
from launch import CONFIGS, ENV, HERE, launch_2, launch_2_command
from safetensors.torch import load_file
from toy import TOY_OVERRIDES, count_e_words, run_overrides, write_toy_task

from alignment.conditioning import Conditioning
from alignment.config import load_config
from alignment.evaluation import ScoredSamples, likelihood_metrics
from alignment.interfaces import Generation
from alignment.models import load_model_and_tokenizer
from alignment.records import load_samples
from experiments.cli import main


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_parse(path):
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] in {t.value for t in DistributedType}
    assert f"--config_file experiments/accelerate/{path.name}" in path.read_text()


# mode: (LoRA, engine forced by `sharded_cpu`, shipped accelerate config launched with)
TRAIN_MODES = {
    "top-blocks": (False, None, "ddp.yaml"),
    "lora": (True, None, "ddp.yaml"),
    "fsdp": (False, "fsdp", "ddp.yaml"),
    "zero2": (False, "deepspeed", "zero2.yaml"),
    "zero2-lora": (True, "deepspeed", "zero2.yaml"),
    "zero3-offload": (False, "deepspeed", "zero3_offload.yaml"),
}


@pytest.mark.parametrize("mode", list(TRAIN_MODES))
def test_two_processes_train_as_one(tmp_path, mode):
    """Same items, same seed: the weights and logged losses equal the one-process run's. The
    shards differ in token count and the last batch leaves one rank empty. Under FSDP 2 each
    rank holds half of every weight, the control tokens' embedding rows (scaled steps) on one.
    Under DeepSpeed the clipping and the step are DeepSpeed's (ZeRO-3: on its CPU Adam, with
    every weight partitioned), and the control rows' step is not scaled (refused there)."""
    lora, engine, config = TRAIN_MODES[mode]
    multiplier = 1.0 if engine == "deepspeed" else 2.0
    train_shard.main(str(tmp_path / "one"), lora=lora, control_lr_multiplier=multiplier)
    options = [*(["lora"] if lora else []), *([engine] if engine else [])]
    launch_2(str(HERE / "train_shard.py"), str(tmp_path / "two"), *options, config=config)
    histories = [json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two")]
    assert len(histories[0]) == len(histories[1]) == 6
    for a, b in zip(*histories, strict=True):
        assert a["tokens"] == b["tokens"]
        for key in ("loss", "nll", "entropy", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    one, two = (load_file(tmp_path / d / "weights.safetensors") for d in ("one", "two"))
    # sharded weights, gathered, name a tied matrix once (`whole_state_dict`), as a checkpoint does
    sharded = mode in ("fsdp", "zero3-offload")
    assert set(two) == set(one) - ({"lm_head.weight"} if sharded else set())
    for name, value in two.items():
        assert (one[name] - value).abs().max() < 1e-3, name


def test_ppo_on_two_processes_updates_as_one(tmp_path):
    """One PPO update on the same episodes: rollout split and gathered, each minibatch split with
    token-weighted losses, so weights, value head, logged stats and KL coefficient match."""
    ppo_shard.main(str(tmp_path / "one"))
    launch_2(str(HERE / "ppo_shard.py"), str(tmp_path / "two"))
    one, two = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two"))
    assert two["kl_coef"] == pytest.approx(one["kl_coef"], rel=1e-6)
    assert len(one["steps"]) == len(two["steps"]) == 8  # 2 epochs of 13 episodes, 4 at a time
    keys = ("loss", "policy_loss", "value_loss", "approx_kl", "grad_norm", "rollout_kl")
    # The first step's gradient (its norm) is the one-process gradient to float precision:
    # unweighted shares are 2.4% off here. Adam at lr 1e-2 then amplifies float-order noise,
    # ~1e-3 by the 8th step.
    first = one["steps"][0]
    assert all(two["steps"][0][k] == pytest.approx(first[k], rel=1e-5, abs=1e-7) for k in keys)
    for a, b in zip(one["steps"], two["steps"], strict=True):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-2, abs=1e-4), key
    weights = [load_file(tmp_path / d / "weights.safetensors") for d in ("one", "two")]
    assert any(k.startswith("value_head.") for k in weights[0])
    for name, value in weights[0].items():
        assert (weights[1][name] - value).abs().max() < 1e-3, name


SETTINGS = [
    *TOY_OVERRIDES,
    "iterations=1",
    "data.prompts_per_iteration=9",
    "data.samples_per_prompt=4",
    "train.num_epochs=1",
    "train.batch_size=8",
    "eval.samples_per_prompt=2",
]


def train_2(out: Path, toy: tuple[Path, Path], reward: str) -> list[str]:
    """The `accelerate launch` arguments of `quark-alt train` on the toy task into `out`."""
    args = ["-m", "experiments.cli", "train", "-", *SETTINGS, f"reward.name=toy:{reward}"]
    return args + run_overrides(out, *toy)


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    """The toy task run for one iteration on one process (in-process) and on two."""
    tmp_path = tmp_path_factory.mktemp("loop")
    toy = write_toy_task(tmp_path)
    runs = {name: tmp_path / name for name in ("one", "two")}
    settings = [*SETTINGS, "reward.name=toy:count_e_words"]
    assert main(["train", "-", *settings, *run_overrides(runs["one"], *toy)]) == 0
    launch_2(*train_2(runs["two"], toy, "count_e_words"))
    return toy, runs


def test_loop_on_two_processes(loop_runs):
    """`quark-alt train` under accelerate: one iteration, each stage file written once and whole."""
    _, runs = loop_runs
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
    # each rank scored the likelihoods of its own slice: gathered, they are one process's numbers
    # on the same samples and weights (the runs' samples differ, so compare with a recomputation)
    recomputed = one_process_likelihood(runs["two"], "iter_001")
    for key in ("ref_perplexity", "kl"):
        assert evals[1][key] == pytest.approx(recomputed[key], rel=1e-5, abs=1e-6), key
    metrics = (runs["two"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["iteration"] for m in metrics] == [0, 1]
    assert not list(runs["two"].rglob(".*.tmp"))


def one_process_likelihood(run: Path, iteration: str) -> dict[str, float]:
    """`likelihood_metrics` of a run's saved eval samples under its checkpoint, on this process."""
    config = load_config(run / "config.yaml")
    policy, tokenizer = load_model_and_tokenizer(
        str(run / "checkpoints" / iteration), dtype=config.model.dtype, device="cpu"
    )
    reference, _ = load_model_and_tokenizer(
        config.model.policy, dtype=config.model.dtype, device="cpu"
    )
    conditioning = Conditioning.load(run / "checkpoints" / iteration, tokenizer)
    records = load_samples(run / iteration / "eval_samples.jsonl")
    pairs = [(r.prompt, g) for r in records for g in r.generations]
    scored = ScoredSamples(
        prompts=[p for p, _ in pairs],
        conditioned=[conditioning.condition(p) for p, _ in pairs],
        generations=[Generation(g, "stop", 0) for _, g in pairs],  # only the text is scored
        rewards=[None] * len(pairs),
        samples_per_prompt=config.eval.samples_per_prompt,
    )
    batch_size = config.train.batch_size
    return likelihood_metrics(policy, reference, tokenizer, config.sampling, batch_size, scored)


CHECKPOINT = Path("checkpoints") / "iter_001" / "model.safetensors"


def trained_weights(run: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    """A run's iteration-1 checkpoint weights, asserted to differ from the initial model's."""
    trained = load_file(run / CHECKPOINT)
    initial = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    return trained


# engine: (engine forced by `sharded_cpu`, shipped accelerate config, extra settings)
LOOP_ENGINES = {
    "fsdp": ("fsdp", "ddp.yaml", []),
    "zero3-offload": ("deepspeed", "zero3_offload.yaml", []),
    "zero2-lora": ("deepspeed", "zero2.yaml", ["train.lora={}"]),
}


@pytest.mark.parametrize("name", list(LOOP_ENGINES))
def test_loop_under_sharding_engines(loop_runs, tmp_path, name):
    """The same command under FSDP 2 or DeepSpeed (`sharded_cpu`): sampling from the gathered
    weights draws what DDP's ranks drew, the gathered checkpoint is the policy the evaluation
    scored, and a rerun with one more iteration resumes from the engine's optimizer state (with
    LoRA: a new adapter, so a new DeepSpeed engine). (The trainer's numbers under each engine:
    test_two_processes_train_as_one.)"""
    toy, runs = loop_runs
    engine, config, extra = LOOP_ENGINES[name]
    out = tmp_path / name
    args = train_2(out, toy, "count_e_words")[2:]
    if "train.lora={}" in extra:  # the adapters train, over a frozen base
        args.remove("train.unfrozen_layers_ratio=1.0")
    command = [str(HERE / "sharded_cpu.py"), engine, *args]
    launch_2(*command, *extra, config=config)
    ddp = runs["two"]
    for stage in ["samples.jsonl", "scored.jsonl", "pool.jsonl"]:  # drawn before any training
        path = Path("iter_001") / stage
        assert (out / path).read_text() == (ddp / path).read_text(), stage
    trained = trained_weights(out, toy[0])
    assert {k: v.shape for k, v in trained.items()} == {
        k: v.shape for k, v in load_file(ddp / CHECKPOINT).items()
    }
    result = json.loads((out / "iter_001" / "eval.json").read_text())
    recomputed = one_process_likelihood(out, "iter_001")
    for key in ("ref_perplexity", "kl"):
        assert result[key] == pytest.approx(recomputed[key], rel=1e-5, abs=1e-6), key
    launch_2(*command, *extra, "iterations=2", config=config)
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["iteration"] for m in metrics] == [0, 1, 2]
    assert (out / "checkpoints" / "iter_002" / "training_state").is_dir()
    assert not list(out.rglob(".*.tmp"))


@pytest.mark.parametrize(
    ("algorithm", "extra"),
    [("rft", ["pool.num_quantiles=2"]), ("alt-rm", [])],
    ids=["rft", "alt-rm"],
)
def test_the_other_conditional_algorithms_run_under_fsdp(loop_runs, tmp_path, algorithm, extra):
    """RFT (no conditioning; 2 quantiles, so that 4 samples fill its best one) and ALT-RM
    (feedback phrases, no new tokens) through the same sharded trainer: one iteration trains,
    evaluates and saves a whole checkpoint."""
    toy, _ = loop_runs
    out = tmp_path / algorithm
    args = train_2(out, toy, "count_e_words")[2:]
    launch_2(str(HERE / "sharded_cpu.py"), "fsdp", *args, f"algorithm={algorithm}", *extra)
    trained_weights(out, toy[0])
    result = json.loads((out / "iter_001" / "eval.json").read_text())
    assert result["reward_n"] == 8 * 2


def test_sigkill_of_one_rank_then_rerun_matches_an_unbroken_run(loop_runs, tmp_path):
    """Rank 1 killed once the samples are written (while the ranks score): torchrun stops the
    other, and the same command rerun ends with the files and weights of the unbroken run."""
    toy, runs = loop_runs
    broken = tmp_path / "broken"
    command = launch_2_command(*train_2(broken, toy, "slow_count_e_words"))
    launcher = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (broken / "iter_001" / "samples.jsonl").exists() and time.time() < deadline:
        assert launcher.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    rank_1 = next(
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if p.environ().get("LOCAL_RANK") == "1"
    )
    rank_1.send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert not (broken / "iter_001" / "eval.json").exists()
    launch_2(*train_2(broken, toy, "slow_count_e_words"))
    unbroken = runs["two"]
    for name in ["samples.jsonl", "scored.jsonl", "pool.jsonl", "eval_samples.jsonl"]:
        path = Path("iter_001") / name
        assert (broken / path).read_text() == (unbroken / path).read_text(), name
    expected = load_file(unbroken / CHECKPOINT)
    for key, value in load_file(broken / CHECKPOINT).items():
        assert torch.equal(value, expected[key]), key
    assert not list(broken.rglob(".*.tmp"))


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "ppo"])
def test_baselines_run_on_two_processes(tmp_path, algorithm):
    """grpo and rloo: trl splits each step's 16 generations over the 2 ranks (8 each, the
    per-device batch), and the gathered scored.jsonl still holds every prompt's 4 generations,
    scored, and the two optimizer steps of one process. ppo: the loop samples and scores, and
    the update (checked against one process by test_ppo_on_two_processes_updates_as_one) logs
    its 2 epochs of 4 minibatches and saves the value head and KL state once."""
    model_dir, prompts = write_toy_task(tmp_path)
    out = tmp_path / "run"
    # model.device left unset, as a user's config leaves it (cpu here, with no GPU)
    settings = [o for o in TOY_OVERRIDES if not o.startswith(("train.", "model.device"))]
    settings += ["iterations=1", "data.prompts_per_iteration=8", "data.samples_per_prompt=4"]
    settings += ["data.num_eval_prompts=2", "eval.samples_per_prompt=2", f"algorithm={algorithm}"]
    settings += [f"{algorithm}.batch_size=8", f"{algorithm}.learning_rate=1e-3"]
    settings += ["reward.name=toy:count_e_words"]
    settings += ["ppo.ppo_epochs=2"] if algorithm == "ppo" else [f"{algorithm}.prompts_per_step=4"]
    launch_2(
        "-m", "experiments.cli", "train", "-", *settings, *run_overrides(out, model_dir, prompts)
    )
    records = load_samples(out / "iter_001" / "scored.jsonl")
    assert len({r.prompt for r in records}) == len(records) == 8
    for record in records:
        assert len(record.generations) == 4
        assert record.rewards == count_e_words(None, record.generations)
    steps = [json.loads(s) for s in (out / "iter_001" / "train_log.jsonl").read_text().splitlines()]
    if algorithm == "ppo":
        assert len(steps) == 2 * 4 and all(s["episodes"] == 32 for s in steps)
        state = out / "checkpoints" / "iter_001" / "training_state"
        assert (state / "value_head.safetensors").exists() and (state / "ppo_state.json").exists()
    else:
        assert [s["step"] for s in steps] == [1, 2]
    trained_weights(out, model_dir)
    assert not (out / "iter_001" / "trl").exists() and not list(out.rglob(".*.tmp"))
