"""The vLLM backend: its settings and its start-up errors here; a real engine only where vLLM is."""

import importlib.util

import pytest
import torch

from alignment.config import SamplingConfig, load_config
from alignment.errors import UserError
from experiments.cli import main
from samplers import HFSampler, make_sampler
from samplers.vllm import sampling_params

HAS_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def test_sampling_params_carry_the_run_settings_and_ban_the_controls():
    config = SamplingConfig(temperature=0.7, top_p=0.8, max_new_tokens=12)
    params = sampling_params(config, 4, seed=5, greedy=False, stop_ids=[2, 9], banned_ids=[7, 8])
    assert params == {
        "n": 4,
        "temperature": 0.7,
        "top_p": 0.8,
        "max_tokens": 12,
        "seed": 5,
        "stop_token_ids": [2, 9],
        "logit_bias": {7: -100.0, 8: -100.0},
        "skip_special_tokens": True,
    }
    greedy = sampling_params(config, 1, seed=5, greedy=True, stop_ids=[2], banned_ids=[])
    assert (greedy["temperature"], greedy["top_p"], greedy["logit_bias"]) == (0.0, 1.0, None)


def test_backend_is_validated_and_hf_is_the_default(tiny_model, tiny_tokenizer):
    assert isinstance(make_sampler(tiny_model, tiny_tokenizer, SamplingConfig()), HFSampler)
    with pytest.raises(UserError, match="'sampling.backend' must be one of"):
        load_config(None, ["sampling.backend=tgi"])
    with pytest.raises(ValueError, match="sampling.backend must be hf or vllm"):
        SamplingConfig(backend="tgi")  # type: ignore[arg-type]


@pytest.mark.skipif(HAS_VLLM, reason="checks the error where vLLM is missing")
def test_vllm_backend_without_vllm_fails_before_loading(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "-", "sampling.backend=vllm", f"out_dir={out}"]) == 2
    assert "sampling.backend=vllm needs vLLM" in capsys.readouterr().err
    assert not out.exists()
    assert main(["generate", "embedded:smollm2-135m-instruct", "x", "--backend", "vllm"]) == 2


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM and a CUDA GPU")
def test_vllm_sampler_follows_the_policy_weights(tiny_model_dir):  # pragma: no cover
    from alignment.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), device="cuda")
    sampler = make_sampler(model, tokenizer, SamplingConfig(max_new_tokens=8))
    before = sampler.sample(["TL;DR:"], 2, seed=0, greedy=True)
    assert len(before) == 1 and len(before[0]) == 2
    with torch.no_grad():  # a different policy must give a different greedy continuation
        for param in model.parameters():
            param.mul_(-1.0)
    assert sampler.sample(["TL;DR:"], 1, seed=0, greedy=True)[0][0].text != before[0][0].text
