"""Held-out evaluation of a policy: reward, reference perplexity, KL, length, diversity.

Conditioned generations are scored by the same reward as training. Perplexity is the mean of
per-sample perplexities under the reference on the bare prompt, as ALT reports it (so numbers
compare with the paper's); KL is the Monte Carlo estimate sum_t log p_policy - log p_ref over
the sampled generations (biased by the temperature and top_p the sampler applies: read it as a
drift indicator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.conditioning import Conditioning
from alignment.config import Config
from alignment.interfaces import Sampler, ScoreFn
from alignment.metrics import distinct_n, mean_and_stderr, mean_perplexity, sequence_kl_estimate
from alignment.prompts import PromptRow
from alignment.trainer import encode_prompt, encode_target, target_logprobs

EVAL_SEED_OFFSET = 10_000  # the same eval draws at every iteration, apart from the policy


def evaluate(
    sampler: Sampler,
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[PromptRow],
    score: ScoreFn,
    config: Config,
    conditioning: Conditioning | None,
) -> dict:
    """Metrics of `policy` on `rows`, conditioned on the best control (None: unconditioned)."""
    texts = [conditioning.condition(r.prompt) if conditioning else r.prompt for r in rows]
    k = config.eval.samples_per_prompt
    sampled = sampler.sample(texts, k, seed=config.seed + EVAL_SEED_OFFSET)
    prompts = [r.prompt for r in rows for _ in range(k)]
    conditioned = [t for t in texts for _ in range(k)]
    gens = [g for gs in sampled for g in gs]
    completions = [g.text for g in gens]
    rewards = score(prompts, completions)
    mean, stderr = mean_and_stderr(rewards)
    result = {
        "reward_mean": mean,
        "reward_stderr": stderr,
        "reward_n": sum(r is not None and math.isfinite(r) for r in rewards),
        "length": sum(g.num_tokens for g in gens) / len(gens),
        "stopped_fraction": sum(g.finish_reason == "stop" for g in gens) / len(gens),
        "distinct_1": distinct_n(completions, 1),
        "distinct_2": distinct_n(completions, 2),
    }
    result.update(
        _likelihood_metrics(policy, reference, tokenizer, config, prompts, conditioned, completions)
    )
    if config.eval.greedy:
        greedy = [gs[0].text for gs in sampler.sample(texts, 1, seed=0, greedy=True)]
        result["greedy_reward_mean"], result["greedy_reward_stderr"] = mean_and_stderr(
            score([r.prompt for r in rows], greedy)
        )
    result["examples"] = [
        {"prompt_id": r.id, "generation": gs[0].text}
        for r, gs in zip(rows[:3], sampled[:3], strict=False)
    ]
    return result


def _likelihood_metrics(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: Config,
    prompts: list[str],
    conditioned: list[str],
    completions: list[str],
) -> dict[str, float]:
    # Generation tokens without EOS, as ALT's perplexity script scores the raw text.
    max_new = config.sampling.max_new_tokens
    targets = [encode_target(tokenizer, c, add_eos=False, max_tokens=max_new) for c in completions]
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        return {"ref_perplexity": math.nan, "kl": math.nan}
    targets = [targets[i] for i in keep]
    bare = [encode_prompt(tokenizer, prompts[i], config.sampling) for i in keep]
    cond = [encode_prompt(tokenizer, conditioned[i], config.sampling) for i in keep]
    pad, size = tokenizer.pad_token_id, config.train.batch_size
    ref_lp = target_logprobs(reference, bare, targets, pad, size)
    pol_lp = target_logprobs(policy, cond, targets, pad, size)
    ref_padded = pad_sequence(ref_lp, batch_first=True)
    mask = pad_sequence([torch.ones_like(x) for x in ref_lp], batch_first=True)
    kl = sequence_kl_estimate(pad_sequence(pol_lp, batch_first=True), ref_padded, mask).tolist()
    return {"ref_perplexity": mean_perplexity(ref_padded, mask), "kl": sum(kl) / len(kl)}
