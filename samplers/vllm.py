"""vLLM backend (`sampling.backend: vllm`, the `vllm` extra): the Sampler shape on vLLM's engine.

For GPU runs where sampling dominates (ALT draws 96 generations of 2048 prompts per iteration).
The engine holds its own copy of the policy: it starts from the policy's weights saved once to a
folder (with the tokenizer and its added control tokens), and before every `sample` call the
policy's current parameters are loaded into it in place (`load_weights`, as trl's colocated vLLM
does), so each iteration samples from the policy the loop just trained. Prompts are encoded and
cut exactly as the transformers sampler does; control tokens are never generated.

Not run in this repository's CI or on its development machine (no GPU, no vLLM): the tests that
need it are skipped without it. vLLM's in-process engine internals change between releases;
`load_weights` here follows vLLM 0.8-0.10's single-process executor.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.conditioning import control_token_ids
from alignment.config import SamplingConfig
from alignment.errors import UserError
from alignment.interfaces import Generation
from alignment.models import stop_token_ids
from samplers.hf import encode_prompts


def require_vllm() -> None:
    """Fail at start-up, before any model loads, when the backend is asked for but missing."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "sampling.backend=vllm needs vLLM, which is not installed: "
            "pip install -e '.[vllm]' (a CUDA machine), or use sampling.backend=hf"
        )


def sampling_params(
    config: SamplingConfig,
    num_samples: int,
    seed: int,
    greedy: bool,
    stop_ids: Sequence[int],
    banned_ids: Sequence[int],
) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one call: the run's sampling settings,
    its stop tokens, and the control tokens pushed out of reach (a bias of -100 on their logits
    leaves them with probability ~e^-100: never sampled)."""
    return {
        "n": num_samples,
        "temperature": 0.0 if greedy else config.temperature,
        "top_p": 1.0 if greedy else config.top_p,
        "max_tokens": config.max_new_tokens,
        "seed": seed,
        "stop_token_ids": list(stop_ids),
        "logit_bias": {int(i): -100.0 for i in banned_ids} or None,
        "skip_special_tokens": True,
    }


class VLLMSampler:
    """Sample with vLLM from the current weights of a transformers policy."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: SamplingConfig,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.4,
    ) -> None:
        require_vllm()
        import vllm

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.stop_ids = stop_token_ids(model, tokenizer, config.stop_at_newline)
        self.banned_ids = control_token_ids(tokenizer)
        self._folder = tempfile.TemporaryDirectory(prefix="quark-alt-vllm-")
        model.save_pretrained(self._folder.name, safe_serialization=True)
        tokenizer.save_pretrained(self._folder.name)
        self.llm = vllm.LLM(
            model=self._folder.name,
            tokenizer=self._folder.name,
            dtype=str(model.dtype).removeprefix("torch."),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=config.max_prompt_tokens + config.max_new_tokens,
        )

    def _sync_weights(self) -> None:
        """The policy's current parameters into the engine, in place, then a fresh prefix cache
        (cached prefixes were computed with the old weights)."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        engine_model.load_weights((name, p.data) for name, p in self.model.named_parameters())
        self.llm.reset_prefix_cache()

    def sample(
        self, prompts: Sequence[str], num_samples: int, *, seed: int, greedy: bool = False
    ) -> list[list[Generation]]:
        import vllm
        from vllm.inputs import TokensPrompt

        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self._sync_weights()
        params = vllm.SamplingParams(
            **sampling_params(
                self.config, num_samples, seed, greedy, self.stop_ids, self.banned_ids
            )
        )
        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in encode_prompts(
            self.tokenizer, prompts, self.config
        )]  # fmt: skip
        outputs = self.llm.generate(inputs, params, use_tqdm=len(inputs) > 1)
        return [
            [
                Generation(
                    text=o.text,
                    finish_reason="stop" if o.finish_reason == "stop" else "length",
                    num_tokens=len(o.token_ids),
                )
                for o in out.outputs
            ]
            for out in outputs
        ]
