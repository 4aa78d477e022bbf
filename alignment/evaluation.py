"""Held-out evaluation of a policy: reward, reference perplexity, KL, length, diversity.

Conditioned generations are scored by the same reward as training. Perplexity is the mean of
per-sample perplexities under the reference on the bare prompt, as ALT reports it (so numbers
compare with the paper's); KL is the Monte Carlo estimate sum_t log p_policy - log p_ref over
the sampled generations (biased by the temperature and top_p the sampler applies: read it as a
drift indicator).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.comparison import conditioning_curve
from alignment.conditioning import Conditioning, control_token_ids
from alignment.config import Config, SamplingConfig
from alignment.interfaces import Generation, Sampler, ScoreFn
from alignment.metrics import (
    distinct_n,
    mean_and_stderr,
    mean_perplexity,
    per_sample_perplexity,
    sequence_kl_estimate,
)
from alignment.prompts import PromptRow
from alignment.records import SampleRecord
from alignment.trainer import encode_prompt, encode_target, target_logprobs

EVAL_SEED_OFFSET = 10_000  # the same eval draws at every iteration, apart from the policy


@dataclass(frozen=True)
class ScoredSamples:
    """K generations per prompt, flattened prompt-major, with their rewards.

    `prompts` are the raw prompts and `conditioned` the texts the policy saw, one per generation;
    `rewards` holds None where the scorer gave no usable value.
    """

    prompts: list[str]
    conditioned: list[str]
    generations: list[Generation]
    rewards: list[float | None]
    samples_per_prompt: int

    @property
    def completions(self) -> list[str]:
        return [g.text for g in self.generations]


# `likelihood_metrics`' signature: (policy, reference, tokenizer, sampling, batch_size, scored)
LikelihoodFn = Callable[
    [PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase, SamplingConfig, int, ScoredSamples],
    dict[str, float],
]


def sample_and_score(
    sampler: Sampler,
    rows: Sequence[PromptRow],
    score: ScoreFn,
    conditioning: Conditioning | None,
    samples_per_prompt: int,
    seed: int,
    quantile: int = 0,
) -> ScoredSamples:
    """Draw `samples_per_prompt` generations per row conditioned on `quantile`, and score them."""
    texts = [conditioning.condition(r.prompt, quantile) if conditioning else r.prompt for r in rows]
    k = samples_per_prompt
    sampled = sampler.sample(texts, k, seed=seed)
    prompts = [r.prompt for r in rows for _ in range(k)]
    gens = [g for gs in sampled for g in gs]
    rewards = score(prompts, [g.text for g in gens])
    return ScoredSamples(prompts, [t for t in texts for _ in range(k)], gens, rewards, k)


def sample_metrics(scored: ScoredSamples) -> dict[str, float]:
    """Reward (per generation), length, stop rate, dist-n and the share of empty generations.

    The empty share is reported on its own because an empty summary scores the reward's floor:
    a policy can gain (or lose) most of its reward by how often it says nothing at all."""
    gens, completions = scored.generations, scored.completions
    mean, stderr = mean_and_stderr(scored.rewards)
    return {
        "reward_mean": mean,
        "reward_stderr": stderr,
        "reward_n": sum(r is not None and math.isfinite(r) for r in scored.rewards),
        "length": sum(g.num_tokens for g in gens) / len(gens),
        "stopped_fraction": sum(g.finish_reason == "stop" for g in gens) / len(gens),
        "empty_fraction": sum(not c.strip() for c in completions) / len(completions),
        "distinct_1": distinct_n(completions, 1),
        "distinct_2": distinct_n(completions, 2),
    }


def evaluate(
    sampler: Sampler,
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[PromptRow],
    score: ScoreFn,
    config: Config,
    conditioning: Conditioning | None,
    likelihood: LikelihoodFn | None = None,
) -> tuple[dict, ScoredSamples]:
    """Metrics of `policy` on `rows`, conditioned on the best control (None: unconditioned).

    `likelihood` computes the perplexity and KL (default `likelihood_metrics`; a multi-process
    run passes one that splits the samples across processes, as it does `sampler` and `score`).

    Also returns the scored generations the metrics were computed from, for the caller to keep
    or to reuse as the best control of `sample_conditioning_curve`.
    """
    scored = sample_and_score(
        sampler,
        rows,
        score,
        conditioning,
        config.eval.samples_per_prompt,
        seed=config.seed + EVAL_SEED_OFFSET,
    )
    result: dict = sample_metrics(scored)
    result.update(
        (likelihood or likelihood_metrics)(
            policy, reference, tokenizer, config.sampling, config.train.batch_size, scored
        )
    )
    if config.eval.greedy:
        texts = [conditioning.condition(r.prompt) if conditioning else r.prompt for r in rows]
        greedy = [gs[0].text for gs in sampler.sample(texts, 1, seed=0, greedy=True)]
        result["greedy_reward_mean"], result["greedy_reward_stderr"] = mean_and_stderr(
            score([r.prompt for r in rows], greedy)
        )
    k = scored.samples_per_prompt
    result["examples"] = [
        {"prompt_id": r.id, "generation": scored.generations[i * k].text}
        for i, r in enumerate(rows[:3])
    ]
    result["heldout"] = heldout_fingerprint(rows)
    return result, scored


def sample_conditioning_curve(
    sampler: Sampler,
    rows: Sequence[PromptRow],
    score: ScoreFn,
    conditioning: Conditioning,
    samples_per_prompt: int,
    seed: int,
    best: ScoredSamples | None = None,
) -> dict:
    """`comparison.conditioning_curve` of a policy: sampled rewards under every control.

    Every control gets the same prompts and seed, so the controls differ only in the control.
    Sampled rewards only (no greedy decoding, no likelihoods): the curve costs one sampling
    pass per control. `best`, the same draws already made for control 0, saves one pass.
    """
    rewards = [
        (
            best
            if q == 0 and best is not None
            else sample_and_score(
                sampler, rows, score, conditioning, samples_per_prompt, seed, quantile=q
            )
        ).rewards
        for q in range(len(conditioning.controls))
    ]
    return conditioning_curve(conditioning.controls, rewards, samples_per_prompt)


def heldout_fingerprint(rows: Sequence[PromptRow]) -> dict:
    """Which held-out prompts an evaluation used, so that reports never compare across sets.

    The sorted prompt ids, and the SHA-256 of the (id, prompt text) pairs in id order: the same
    ids with other texts (another file, another truncation) give another hash.
    """
    pairs = sorted((r.id, r.prompt) for r in rows)
    digest = hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"prompt_ids": [i for i, _ in pairs], "prompts_sha256": digest}


def scored_records(
    rows: Sequence[PromptRow], scored: ScoredSamples, iteration: int
) -> list[SampleRecord]:
    """The scored generations as sample records (one per prompt), to save beside the metrics."""
    k = scored.samples_per_prompt
    return [
        SampleRecord(
            prompt=r.prompt,
            id=r.id,
            iteration=iteration,
            generations=[g.text for g in scored.generations[i * k : (i + 1) * k]],
            rewards=scored.rewards[i * k : (i + 1) * k],
            finish_reasons=[g.finish_reason for g in scored.generations[i * k : (i + 1) * k]],
        )
        for i, r in enumerate(rows)
    ]


@dataclass(frozen=True)
class LikelihoodTerms:
    """The per-sample values behind `likelihood_metrics`, of the generations with at least one
    token: what each process computes for its own slice of the samples, to be gathered.

    `perplexity`: (n,) reference perplexity of each generation; `kl`: (n,) its log-ratio sum.
    """

    perplexity: Tensor
    kl: Tensor


def likelihood_terms(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sampling: SamplingConfig,
    batch_size: int,
    scored: ScoredSamples,
    part: slice = slice(None),
) -> LikelihoodTerms:
    """Per-sample reference perplexity (bare prompt) and KL estimate of the samples in `part`.

    The policy scores each generation after the text it was conditioned on; `tokenizer` must be
    the policy's (a superset of the reference's vocabulary: the control tokens only).
    """
    prompts, conditioned = scored.prompts[part], scored.conditioned[part]
    # Generation tokens without EOS, as ALT's perplexity script scores the raw text.
    max_new = sampling.max_new_tokens
    targets = [
        encode_target(tokenizer, c, add_eos=False, max_tokens=max_new)
        for c in scored.completions[part]
    ]
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        return LikelihoodTerms(torch.empty(0), torch.empty(0))
    targets = [targets[i] for i in keep]
    bare = [encode_prompt(tokenizer, prompts[i], sampling) for i in keep]
    cond = [encode_prompt(tokenizer, conditioned[i], sampling) for i in keep]
    pad = tokenizer.pad_token_id
    ref_lp = target_logprobs(reference, bare, targets, pad, batch_size)
    # the policy as sampled: the samplers never emit a control token (its mass, counted, biased
    # the KL low by its log(1 - mass) per token: -0.39 nats per sample on the toy vocabulary)
    banned = control_token_ids(tokenizer)
    pol_lp = target_logprobs(policy, cond, targets, pad, batch_size, banned)
    ref_padded = pad_sequence(ref_lp, batch_first=True)
    mask = pad_sequence([torch.ones_like(x) for x in ref_lp], batch_first=True)
    return LikelihoodTerms(
        per_sample_perplexity(ref_padded, mask),
        sequence_kl_estimate(pad_sequence(pol_lp, batch_first=True), ref_padded, mask),
    )


def combine_likelihood_terms(parts: Sequence[LikelihoodTerms]) -> dict[str, float]:
    """`ref_perplexity` and `kl` of all the samples of `parts` (in order), NaN when none has a
    token: the same numbers whether the samples were scored in one part or in many."""
    kl = torch.cat([p.kl for p in parts]).tolist()
    if not kl:
        return {"ref_perplexity": math.nan, "kl": math.nan}
    perplexity = mean_perplexity(torch.cat([p.perplexity for p in parts]))
    return {"ref_perplexity": perplexity, "kl": sum(kl) / len(kl)}


def likelihood_metrics(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sampling: SamplingConfig,
    batch_size: int,
    scored: ScoredSamples,
) -> dict[str, float]:
    """Mean per-sample perplexity under `reference` (bare prompt) and the mean KL estimate, all
    samples in this process (`loop.sharded_likelihood` splits them across processes)."""
    terms = likelihood_terms(policy, reference, tokenizer, sampling, batch_size, scored)
    return combine_likelihood_terms([terms])
