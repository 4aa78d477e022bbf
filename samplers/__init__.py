"""Samplers: draw K generations per prompt from a policy.

They implement `alignment.interfaces.Sampler`, the shape the loop talks to: `HFSampler`
(transformers, runs on CPU; the default) and `VLLMSampler` (`sampling.backend: vllm`, the `vllm`
extra). `make_sampler` picks the one a config asks for.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.config import SamplingConfig
from alignment.interfaces import Generation, Sampler
from samplers.hf import HFSampler

__all__ = ["Generation", "HFSampler", "Sampler", "make_sampler"]


def make_sampler(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: SamplingConfig
) -> Sampler:
    if config.backend == "vllm":
        from samplers.vllm import VLLMSampler  # imports vLLM: only when asked for

        return VLLMSampler(model, tokenizer, config)
    return HFSampler(model, tokenizer, config)
