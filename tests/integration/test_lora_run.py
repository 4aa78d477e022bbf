"""`train.lora` through the whole loop: plain checkpoints, exact resume, `quark-alt generate`."""

from __future__ import annotations

import json

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


def _train(out, toy, iterations):
    model_dir, prompts = toy
    args = [f"out_dir={out}", f"model.policy={model_dir}", f"data.train_prompts={prompts}"]
    settings = [o for o in SMALL if o != "train.unfrozen_layers_ratio=1.0"]
    assert main(["train", "-", *settings, *args, "reward.name=toy:count_e_words", iterations]) == 0


def test_lora_run_resumes_exactly_and_its_checkpoint_loads_and_generates(tmp_path, capsys):
    toy = write_toy_task(tmp_path)
    unbroken, resumed = tmp_path / "unbroken", tmp_path / "resumed"
    _train(unbroken, toy, "iterations=2")
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
    capsys.readouterr()
    lengths = ["--max-prompt-tokens", "64", "--keep-tail-tokens", "8", "--max-new-tokens", "8"]
    assert main(["generate", str(checkpoint), PROMPT, *lengths, "--greedy", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out.splitlines()[0])["generation"]
    model, tokenizer = load_model_and_tokenizer(str(checkpoint), device="cpu")
    assert quantile_token(0) in tokenizer.get_added_vocab()
    sampling = SamplingConfig(max_new_tokens=8, max_prompt_tokens=64, keep_tail_tokens=8)
    sampler = HFSampler(model, tokenizer, sampling)
    conditioned = sampler.sample([quantile_token(0) + PROMPT], 1, seed=0, greedy=True)
    assert generated == conditioned[0][0].text
