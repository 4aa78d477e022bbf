"""alt-feedback through the loop, with a canned chat endpoint on 127.0.0.1 writing the feedback."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import pytest
import torch
from launch import HERE, launch_2
from toy import TOY_OVERRIDES, count_e_words, run_overrides, write_toy_task

import alignment.trainer
from alignment.config import load_config
from alignment.errors import UserError
from alignment.loop import run
from alignment.models import load_model_and_tokenizer
from alignment.records import load_samples
from experiments.commands.train import build_feedback
from rewards.feedback import HH_CATEGORIES
from samplers import HFSampler

FAST = [
    "algorithm=alt-feedback",
    "data.prompts_per_iteration=8",
    "data.samples_per_prompt=8",
    "data.num_eval_prompts=4",
    "train.num_epochs=1",
    "eval.samples_per_prompt=2",
    "eval.greedy=false",
    "eval.conditioning_curve=false",
    "feedback_provider.api_key_env=null",
    "feedback_provider.max_retries=0",
    "feedback_provider.timeout=10",
]


def words(completion: str) -> int:
    return len(completion.split())


def unparsable(completion: str) -> bool:
    return len(completion) % 5 == 0


def summary(body: dict, start: str, end: str) -> str:
    """The completion the request asks about, as the prompt template framed it."""
    text = body["messages"][-1]["content"]
    return re.search(re.escape(start) + "(.*?)" + re.escape(end), text, re.S)[1]


def alt_reply(body: dict) -> str:
    """ALT-LMU's reply format, scored by length (so the four buckets differ); some garbage."""
    completion = summary(body, "SUMMARY: ", "\n\nYou are an expert")
    if unparsable(completion):
        return "I would rather not say."
    score = min(3, words(completion) // 2)
    return f"Analysis: it is short.\nFeedback: Has {words(completion)} words.\nScore: {score}"


class RecordingSampler(HFSampler):
    """The real sampler; it also keeps every text it was asked to continue."""

    texts: list[str] = []

    def sample(self, prompts, num_samples, *, seed, greedy=False):
        RecordingSampler.texts += list(prompts)
        return super().sample(prompts, num_samples, seed=seed, greedy=greedy)


@pytest.fixture
def encoded(monkeypatch):
    """Every prompt text the conditional trainer encodes (the policy's inputs and the bare
    prompts the reference sees)."""
    seen: list[str] = []
    real = alignment.trainer.encode_prompt

    def spy(tokenizer, text, sampling):
        seen.append(text)
        return real(tokenizer, text, sampling)

    monkeypatch.setattr(alignment.trainer, "encode_prompt", spy)
    return seen


def config_for(tmp_path, server, *extra):
    model_dir, prompts = write_toy_task(tmp_path)
    url = f"http://127.0.0.1:{server.server_port}/v1"
    overrides = [*TOY_OVERRIDES, *FAST, f"feedback_provider.base_url={url}", *extra]
    run_dir = [f"out_dir={tmp_path / 'run'}", f"model.policy={model_dir}"]
    return load_config(None, [*overrides, *run_dir, f"data.train_prompts={prompts}"]), model_dir


def asked(server) -> list[str]:
    return [summary(body, "SUMMARY: ", "\n\nYou are an expert") for _, body in server.requests]


def test_alt_lmu_trains_on_feedback_and_resumes_without_asking_again(tmp_path, server, encoded):
    server.reply = alt_reply
    RecordingSampler.texts = []
    config, model_dir = config_for(tmp_path, server, "iterations=1")
    out = tmp_path / "run"
    run(config, count_e_words, RecordingSampler, build_feedback(config))

    first = load_samples(out / "iter_001" / "feedback.jsonl")
    generations = [g for r in first for g in r.generations]
    assert set(asked(server)) == {g.strip() for g in generations}
    for record in first:
        assert record.rewards is not None and None not in record.rewards  # the RM's stay
        for g, fb, q in zip(record.generations, record.feedback, record.quantiles, strict=True):
            if unparsable(g.strip()):
                assert fb is None and q is None
            else:
                assert fb == f"Has {words(g)} words." and q == 3 - min(3, words(g) // 2)
    stats = json.loads((out / "iter_001" / "feedback_stats.json").read_text())
    assert stats["without_feedback"] == sum(unparsable(g.strip()) for g in generations) > 0
    assert len(set(stats["by_score"].values())) > 1  # the buckets differ

    # the trainer saw each item's own feedback; no item without feedback trained
    texts = {fb for r in first for fb in r.feedback or [] if fb is not None}
    conditioned = [t for t in encoded if t.startswith("feedback: ")]
    assert conditioned and len(conditioned) * 2 == len(encoded)  # each item: policy + reference
    for text in conditioned:
        feedback, prompt = re.fullmatch(r"feedback: (.*?) input: (.*)", text, re.S).groups()
        assert feedback in texts and prompt in {r.prompt for r in first}

    # the exemplar: the most frequent score-3 feedback of iteration 1, saved twice
    counts = Counter(
        fb for r in first for fb, q in zip(r.feedback, r.quantiles, strict=True) if q == 0
    )
    checkpoint = out / "checkpoints" / "iter_001"
    saved = json.loads((checkpoint / "conditioning.json").read_text())
    exemplar = json.loads((checkpoint / "training_state" / "alt_feedback.json").read_text())
    exemplar = exemplar["exemplar"]
    assert counts[exemplar] == max(counts.values())
    assert saved["controls"] == [f"feedback: {exemplar} input: "]
    assert saved["template"] == "feedback: {feedback} input: "
    trained, _ = load_model_and_tokenizer(str(checkpoint), device="cpu")
    initial, _ = load_model_and_tokenizer(str(model_dir), device="cpu")
    assert not torch.equal(
        trained.transformer.h[1].mlp.c_fc.weight, initial.transformer.h[1].mlp.c_fc.weight
    )

    # iteration 2 in a new process: the exemplar comes back from the training state, sampling
    # is conditioned on it, and only iteration 2's generations are asked about
    RecordingSampler.texts, before = [], len(server.requests)
    config, _ = config_for(tmp_path, server, "iterations=2")
    run(config, count_e_words, RecordingSampler, build_feedback(config))
    second = {
        g.strip() for r in load_samples(out / "iter_002" / "feedback.jsonl") for g in r.generations
    }
    assert 0 < len(server.requests) - before and set(asked(server)[before:]) <= second
    best = f"feedback: {exemplar} input: "
    assert RecordingSampler.texts and all(t.startswith(best) for t in RecordingSampler.texts)
    saved = json.loads((out / "checkpoints" / "iter_002" / "conditioning.json").read_text())
    assert saved["controls"] == [best]

    # killed after the feedback stage of iteration 2: neither the server nor its cache is asked
    shutil.rmtree(out / "checkpoints" / "iter_002")
    shutil.rmtree(out / "feedback_cache")
    (out / "iter_002" / "eval.json").unlink()
    before = len(server.requests)
    run(config, count_e_words, HFSampler, build_feedback(config))
    assert len(server.requests) == before
    assert (out / "checkpoints" / "iter_002" / "conditioning.json").read_text() == (
        json.dumps(saved, indent=1) + "\n"
    )


def category_reply(body: dict) -> str:
    completion = summary(body, "Assistant: ", "\nRate it:")
    return HH_CATEGORIES[3 - min(3, words(completion) // 2)]


def test_alt_lmc_conditions_on_categories_best_first(tmp_path, server, encoded):
    server.reply = category_reply
    config, _ = config_for(
        tmp_path,
        server,
        "iterations=1",
        "feedback_provider.parser=categories",
        r'feedback_provider.prompt="Human: {prompt}\nAssistant: {completion}\nRate it:"',
    )
    run(config, count_e_words, HFSampler, build_feedback(config))
    out = tmp_path / "run"
    records = load_samples(out / "iter_001" / "feedback.jsonl")
    for record in records:
        for g, fb, q in zip(record.generations, record.feedback, record.quantiles, strict=True):
            assert q == 3 - min(3, words(g) // 2) and fb == HH_CATEGORIES[q]
    saved = json.loads((out / "checkpoints" / "iter_001" / "conditioning.json").read_text())
    assert saved["controls"] == [f"{c}.\n\n" for c in HH_CATEGORIES]  # the exemplar first
    conditioned = [t for t in encoded if t.split(".\n\n")[0] in HH_CATEGORIES]
    assert conditioned and len(conditioned) * 2 == len(encoded)


@pytest.mark.parametrize("engine", ["ddp", "zero3-offload"])
def test_on_two_processes_each_generation_is_asked_once(tmp_path, server, engine):
    """Under `accelerate launch` the main process alone asks (one writer of the reply cache)
    and both ranks train on the same feedback.jsonl; also with the policy's weights sharded by
    DeepSpeed ZeRO-3 (`sharded_cpu`)."""
    server.reply = alt_reply
    model_dir, prompts = write_toy_task(tmp_path)
    out = tmp_path / "run"
    url = f"http://127.0.0.1:{server.server_port}/v1"
    settings = [*TOY_OVERRIDES, *FAST, f"feedback_provider.base_url={url}", "iterations=1"]
    settings += ["reward.name=toy:count_e_words", *run_overrides(out, model_dir, prompts)]
    if engine == "ddp":
        launch_2("-m", "experiments.cli", "train", "-", *settings)
    else:
        sharded = str(HERE / "sharded_cpu.py")
        launch_2(sharded, "deepspeed", "train", "-", *settings, config="zero3_offload.yaml")
    generations = [
        g for r in load_samples(out / "iter_001" / "feedback.jsonl") for g in r.generations
    ]
    assert len(generations) == 8 * 8
    assert sorted(asked(server)) == sorted(g.strip() for g in generations)  # each once
    state = out / "checkpoints" / "iter_001" / "training_state" / "alt_feedback.json"
    assert json.loads(state.read_text())["exemplar"]


def test_alt_feedback_without_a_feedback_writer_is_refused(tmp_path, server):
    config, _ = config_for(tmp_path, server, "iterations=1")
    with pytest.raises(UserError, match="needs a feedback writer"):
        run(config, count_e_words, HFSampler)
