"""`train.lora` through the whole loop: plain or adapter-only checkpoints, exact resume,
`quark-alt generate`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from toy import TOY_OVERRIDES, write_toy_task

from alignment.conditioning import quantile_token
from alignment.config import SamplingConfig
from alignment.models import load_model_and_tokenizer
from experiments.cli import main
from samplers import HFSampler

SMALL = [
    *TOY_OVERRIDES,
    "data.prompts_per_iteration=8",
    "data.samples_per_prompt=5",
    "train.num_epochs=2",
    "train.batch_size=16",
    "eval.samples_per_prompt=2",
    "train.lora.r=4",
]
PROMPT = "My dog ate a sock TL;DR:"


def _train(out, toy, *overrides):
    model_dir, prompts = toy
    args = [f"out_dir={out}", f"model.policy={model_dir}", f"data.train_prompts={prompts}"]
    settings = [o for o in SMALL if o != "train.unfrozen_layers_ratio=1.0"]
    assert main(["train", "-", *settings, *args, "reward.name=toy:count_e_words", *overrides]) == 0


def _generate(checkpoint, capsys) -> str:
    capsys.readouterr()
    lengths = ["--max-prompt-tokens", "64", "--keep-tail-tokens", "8", "--max-new-tokens", "8"]
    assert main(["generate", str(checkpoint), PROMPT, *lengths, "--greedy", "--json"]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[0])["generation"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def unbroken(toy, tmp_path_factory):
    """A 2-iteration LoRA run with merged checkpoints, unbroken."""
    out = tmp_path_factory.mktemp("merged") / "unbroken"
    _train(out, toy, "iterations=2")
    return out


def test_lora_run_resumes_exactly_and_its_checkpoint_loads_and_generates(
    toy, unbroken, tmp_path, capsys
):
    resumed = tmp_path / "resumed"
    _train(resumed, toy, "iterations=1")  # stopped after iteration 1, then rerun
    _train(resumed, toy, "iterations=2")
    final = "checkpoints/iter_002/model.safetensors"
    expected, weights = load_file(unbroken / final), load_file(resumed / final)
    assert weights.keys() == expected.keys()
    assert not [k for k in weights if "lora" in k or "token_adapter" in k]
    for key, value in weights.items():
        assert torch.equal(value, expected[key]), key
    assert (resumed / "metrics.jsonl").read_text() == (unbroken / "metrics.jsonl").read_text()
    start = load_file(toy[0] / "model.safetensors")["transformer.h.0.attn.c_attn.weight"]
    assert not torch.equal(weights["transformer.h.0.attn.c_attn.weight"], start)

    # a plain checkpoint: loads as any model and generates conditioned on the best token
    checkpoint = resumed / "checkpoints" / "iter_002"
    generated = _generate(checkpoint, capsys)
    model, tokenizer = load_model_and_tokenizer(str(checkpoint), device="cpu")
    assert quantile_token(0) in tokenizer.get_added_vocab()
    sampling = SamplingConfig(max_new_tokens=8, max_prompt_tokens=64, keep_tail_tokens=8)
    sampler = HFSampler(model, tokenizer, sampling)
    conditioned = sampler.sample([quantile_token(0) + PROMPT], 1, seed=0, greedy=True)
    assert generated == conditioned[0][0].text


def _logits(checkpoint) -> torch.Tensor:
    model, tokenizer = load_model_and_tokenizer(str(checkpoint), device="cpu")
    ids = tokenizer(quantile_token(0) + PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_adapter_checkpoints_hold_no_weights_and_load_as_the_merged_run(
    toy, unbroken, tmp_path, capsys
):
    """`train.lora.checkpoint=adapter`: the same run as `unbroken` (its checkpoints merged),
    whose checkpoints hold only the adapters; loaded, its final policy is the merged one, a
    rerun after losing the last checkpoint redoes it exactly, and `generate` reads it."""
    run = tmp_path / "adapter"
    adapter = "train.lora.checkpoint=adapter"
    _train(run, toy, "iterations=2", adapter)
    checkpoints = [run / "checkpoints" / f"iter_{i:03d}" for i in (1, 2)]
    for folder in checkpoints:
        assert (folder / "adapter_model.safetensors").is_file(), folder
        assert not list(folder.glob("model*.safetensors")), folder
    assert json.loads((checkpoints[1] / "adapter_base.json").read_text())["checkpoint"] == (
        "../iter_001"
    )
    assert (run / "metrics.jsonl").read_text() == (unbroken / "metrics.jsonl").read_text()
    merged = unbroken / "checkpoints" / "iter_002"
    expected = _logits(merged)
    torch.testing.assert_close(_logits(checkpoints[1]), expected, atol=1e-5, rtol=0)

    adapter_weights = load_file(checkpoints[1] / "adapter_model.safetensors")
    shutil.rmtree(checkpoints[1])  # lost: the rerun loads iteration 1's adapter and redoes 2
    _train(run, toy, "iterations=2", adapter)
    redone = load_file(checkpoints[1] / "adapter_model.safetensors")
    assert redone.keys() == adapter_weights.keys()
    for key, value in redone.items():
        assert torch.equal(value, adapter_weights[key]), key
    torch.testing.assert_close(_logits(checkpoints[1]), expected, atol=1e-5, rtol=0)

    # conditioned on the best control token, as the merged checkpoint is
    assert quantile_token(0) in load_model_and_tokenizer(str(checkpoints[1]))[1].get_added_vocab()
    assert _generate(checkpoints[1], capsys) == _generate(merged, capsys)
