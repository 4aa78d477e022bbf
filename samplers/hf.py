"""transformers backend with a shared prompt prefill and its own decode loop.

A TL;DR prompt is 300-500 tokens and a summary ~50. `generate(num_return_sequences=K)` prefills
every prompt K times; here each prompt is prefilled once and its K samples decode from that one
KV prefix: where the model's attention can be swapped (transformers' AttentionInterface) the
prefix is kept once per prompt and read once per step for all K rows (`shared_prefix_attention`),
otherwise it is repeated K times into a preallocated StaticCache. Decoding is a loop of our own:
generate's per-step logits processing (a full-vocabulary sort for top-p among it) cost about
40% of a batch-16 forward on CPU, and `top_p_candidates` gets the same exact nucleus from a
`topk` shortlist. Prompts are sorted by length into batches so little compute goes to padding.
Speed against `generate`: benchmarks/README.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch
from tqdm.auto import tqdm
from transformers import (
    AttentionInterface,
    Cache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StaticCache,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignment.conditioning import control_token_ids
from alignment.config import SamplingConfig
from alignment.errors import UserError
from alignment.interfaces import Generation
from alignment.models import stop_token_ids
from alignment.prompts import truncate_middle

log = logging.getLogger(__name__)


TOP_P_SHORTLISTS = (64, 1024)
"""Shortlist sizes `top_p_candidates` tries, in order, before sorting a whole row (see there)."""


def nucleus_mask(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of these descending probabilities top-p keeps.

    A token is kept when the tokens ranked above it hold less than `top_p` of the mass (the rule of
    transformers' TopPLogitsWarper, so the most likely token is always kept), and every token as
    likely as the least likely kept one is kept too: then the kept set does not depend on how a sort
    orders exact ties, so a shortlist and a full sort agree on it. The kept tokens form a prefix.
    """
    before = sorted_probs.cumsum(dim=-1) - sorted_probs
    by_rank = before < top_p
    threshold = sorted_probs.masked_fill(~by_rank, math.inf).amin(dim=-1, keepdim=True)
    return sorted_probs >= threshold


def top_p_candidates(
    logits: torch.Tensor, top_p: float, shortlists: Sequence[int] = TOP_P_SHORTLISTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-p (nucleus) distribution per row, as (token ids, probabilities) of equal shape.

    Probabilities are renormalised over the kept tokens and 0 elsewhere (also in padding
    columns); sample with `ids.gather(1, torch.multinomial(probs, 1))`. Sorting the whole
    vocabulary of every row each step (what generate does) cost a fifth of a decode step, while
    with top_p 0.9 the nucleus of a 49k vocabulary mostly lies in the top few dozen tokens. So
    each row takes only its most likely tokens (`torch.topk`, the sizes in `shortlists`, tried
    in order), and moves on to the next size, in the end a full sort, only when its whole
    shortlist would be kept (the shortlist holds less than `top_p` of the mass, or its last
    token ties with the nucleus' least likely one), as then kept tokens may lie beyond it. The
    result equals filtering a full sort with `nucleus_mask`.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    rows, vocab = probs.shape
    if top_p >= 1.0:
        return torch.arange(vocab, device=probs.device).expand(rows, vocab), probs
    todo = torch.arange(rows, device=probs.device)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, ids, kept probs)
    for size in [*(k for k in shortlists if k < vocab), vocab]:
        subset = probs if len(found) == 0 and size < vocab else probs[todo]
        if size < vocab:
            top, ids = subset.topk(size, dim=-1)
        else:
            top, ids = subset.sort(dim=-1, descending=True)
        keep = nucleus_mask(top, top_p)
        done = ~keep[:, -1] if size < vocab else torch.ones_like(keep[:, -1])
        width = int(keep[done].sum(dim=-1).max()) if done.any() else 0
        found.append((todo[done], ids[done, :width], (top * keep)[done, :width]))
        todo = todo[~done]
        if todo.numel() == 0:
            break
    width = max(kept.shape[1] for _, _, kept in found)
    out_ids = torch.zeros(rows, width, dtype=torch.long, device=probs.device)
    out_probs = torch.zeros(rows, width, dtype=probs.dtype, device=probs.device)
    for where, ids, kept in found:
        out_ids[where, : ids.shape[1]] = ids
        out_probs[where, : kept.shape[1]] = kept
    return out_ids, out_probs / out_probs.sum(dim=-1, keepdim=True)


SHARED_PREFIX_ATTENTION = "quark_shared_prefix"
"""Name of `shared_prefix_attention` in transformers' AttentionInterface (and mask interface)."""

_shared_prefix: ContextVar[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None] = (
    ContextVar("quark_shared_prefix", default=None)
)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """One decode step's attention when K rows in a row share each prompt's KV prefix.

    Repeating a prompt's KV cache K times makes every decode step read K copies of the same
    300-500 prefix tokens (a third of a batch-64 step on CPU), and filling the repeated cache
    cost as much as several steps. Here the cache holds only the generated tokens (`key`,
    `value`, one row per sample) and each prompt's prefix is kept once (set by
    `HFSampler._shared_prefix_context`): the queries of a prompt's K rows attend to it together,
    in one matmul per KV head. The scores of both parts go through one softmax over their
    concatenation (a row always sees its current token, so no row is all masked), whose two
    slices then weight the prefix and the generated values: exact up to rounding, and about 20%
    fewer per-layer seconds than merging two partial softmaxes by their maxima and sums, which
    took a dozen more small elementwise ops per layer and step. Decode only (one query token);
    for eval-mode plain causal attention (no dropout, sliding window, soft-capping or sinks).
    Masks are sdpa's booleans (True = attend).
    """
    prefixes = _shared_prefix.get()
    if prefixes is None:
        raise RuntimeError("shared_prefix_attention called outside HFSampler's decode loop")
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"shared_prefix_attention does not support {unsupported}")
    prefix_key, prefix_value, prefix_mask = prefixes[module.layer_idx]
    rows, heads, q_len, dim = query.shape
    if q_len != 1:
        raise NotImplementedError("shared_prefix_attention handles one query token per row")
    prompts, kv_heads, slots, value_dim = prefix_value.shape
    samples, rep = rows // prompts, heads // kv_heads
    query = query * (scaling if scaling is not None else dim**-0.5)

    def per_prompt(t: torch.Tensor) -> torch.Tensor:
        """(rows, kv_heads, rep, n) -> (prompts, kv_heads, samples * rep, n); query head h
        reads KV head h // rep (transformers' repeat_kv order)."""
        t = t.reshape(prompts, samples, kv_heads, rep, t.shape[-1]).transpose(1, 2)
        return t.reshape(prompts, kv_heads, samples * rep, t.shape[-1])

    def per_row(t: torch.Tensor) -> torch.Tensor:
        """The inverse of `per_prompt`."""
        t = t.reshape(prompts, kv_heads, samples, rep, t.shape[-1]).transpose(1, 2)
        return t.reshape(rows, kv_heads, rep, t.shape[-1])

    query = query.reshape(rows, kv_heads, rep, dim)
    pre = per_prompt(query) @ prefix_key.transpose(-1, -2)  # (prompts, kv_heads, samples*rep, P)
    pre = per_row(torch.where(prefix_mask, pre, -math.inf))
    suf = query @ key.transpose(-1, -2)  # (rows, kv_heads, rep, generated-token slots)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1:, : key.shape[2]]  # (rows, 1, 1, slots)
        suf = torch.where(mask, suf, -math.inf) if mask.dtype == torch.bool else suf + mask
    weights = torch.softmax(torch.cat([pre, suf], dim=-1), dim=-1)
    pre_weights, suf_weights = weights.split([slots, suf.shape[-1]], dim=-1)
    out = per_row(per_prompt(pre_weights) @ prefix_value) + suf_weights @ value
    return out.reshape(rows, 1, heads, value_dim).contiguous(), None


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], config: SamplingConfig
) -> list[list[int]]:
    """Token ids per prompt, over-long ones cut from the middle (and said so, once); every
    backend encodes this way, so they all sample from the same inputs."""
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    cut = sum(len(ids) > config.max_prompt_tokens for ids in encoded)
    if cut:
        log.warning(
            "%d of %d prompts longer than %d tokens were cut in the middle",
            cut,
            len(encoded),
            config.max_prompt_tokens,
        )
    return [
        truncate_middle(ids, config.max_prompt_tokens, config.keep_tail_tokens) for ids in encoded
    ]


def decode_generation(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stop_ids: Sequence[int]
) -> Generation:
    """A generation's text from its new token ids, cut at the first stop token (which neither its
    text nor its token count includes), and at a newline the stop token decodes to; every backend
    decodes through this, so their texts compare."""
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    if end is None:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(text.strip(), "length", len(ids))
    text = tokenizer.decode(ids[: end + 1], skip_special_tokens=True)
    return Generation(text.split("\n", 1)[0].strip(), "stop", end)


class HFSampler:
    """Sample with a transformers causal LM; never emits control tokens."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: SamplingConfig
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.stop_ids = stop_token_ids(model, tokenizer, config.stop_at_newline)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and config.max_prompt_tokens + config.max_new_tokens > limit:
            raise UserError(
                f"sampling.max_prompt_tokens + max_new_tokens = "
                f"{config.max_prompt_tokens + config.max_new_tokens} exceeds the model's "
                f"{limit} positions"
            )

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, self.config)

    @torch.no_grad()
    def sample(
        self, prompts: Sequence[str], num_samples: int, *, seed: int, greedy: bool = False
    ) -> list[list[Generation]]:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        encoded = self.encode_prompts(prompts)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        size = self.config.prompt_batch_size
        batches = [order[i : i + size] for i in range(0, len(order), size)]
        results: list[list[Generation]] = [[] for _ in prompts]
        torch.manual_seed(seed)
        for batch in tqdm(batches, desc="sampling", unit="batch", disable=len(batches) < 2):
            outputs = self._sample_batch([encoded[i] for i in batch], num_samples, greedy)
            for i, gens in zip(batch, outputs, strict=True):
                results[i] = gens
        return results

    def _sample_batch(
        self, batch: list[list[int]], num_samples: int, greedy: bool
    ) -> list[list[Generation]]:
        cfg, device = self.config, self.model.device
        padded = self.tokenizer.pad(
            {"input_ids": batch}, padding_side="left", return_tensors="pt"
        )  # left: every prompt ends where decoding starts
        input_ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        width = input_ids.shape[1]
        # Prefill all but the last prompt token once per prompt, positions as generate() makes them.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = len(batch) * num_samples
        if self._can_share_prefix() and width > 1:
            prefix = self._prefill_each(batch, width - 1)
            # The cache holds the generated tokens only, from the last prompt token on.
            cache: Cache = StaticCache(config=self.model.config, max_cache_len=cfg.max_new_tokens)
            context: AbstractContextManager[None] = self._shared_prefix_context(
                prefix, mask[:, :-1]
            )
            cache_mask = torch.ones(rows, 1, dtype=mask.dtype, device=device)
        else:
            prefill = self.model(
                input_ids=input_ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                use_cache=True,
                logits_to_keep=1,  # the prefill's logits are never used; skip the vocab matmul
            )
            cache = self._repeated_static_cache(
                prefill.cache, num_samples, width + cfg.max_new_tokens
            )
            context = nullcontext()
            cache_mask = mask.repeat_interleave(num_samples, dim=0)
        with context:
            new_tokens = self._decode_loop(
                cache,
                last_ids=input_ids[:, -1].repeat_interleave(num_samples),
                last_positions=positions[:, -1].repeat_interleave(num_samples),
                cache_mask=cache_mask,
                greedy=greedy,
            ).tolist()
        gens = [decode_generation(self.tokenizer, ids, self.stop_ids) for ids in new_tokens]
        return [gens[i : i + num_samples] for i in range(0, len(gens), num_samples)]

    def _can_share_prefix(self) -> bool:
        """Whether `shared_prefix_attention` can stand in for this model's attention.

        It needs a decoder whose attention goes through transformers' AttentionInterface (so it
        can be swapped), plain causal softmax attention (sdpa or eager; no sliding window or
        soft-capping) and one KV tensor pair per layer, in eval mode (it applies no dropout).
        Other models get the prefix repeated K times into a StaticCache.
        """
        model = self.model
        if not isinstance(model, PreTrainedModel) or model.training:
            return False
        config = model.config.get_text_config(decoder=True)
        return (
            not model.config.is_encoder_decoder
            and model.config._attn_implementation in ("sdpa", "eager")
            and type(model)._can_set_attn_implementation()
            and getattr(config, "sliding_window", None) is None
            and getattr(config, "attn_logit_softcapping", None) is None
            and set(getattr(config, "layer_types", None) or ["full_attention"])
            == {"full_attention"}
        )

    def _prefill_each(
        self, batch: list[list[int]], slots: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of every prompt but its last token, left-padded to `slots`.

        Each prompt is prefilled alone: a padded batch computes every padding position too
        (about 14% of the prefill for TL;DR prompts of 235 to 378 tokens), while alone a prompt
        needs neither padding nor a mask, and its positions start at 0 as generate's do. The
        padding slots stay zero; `shared_prefix_attention` masks them.
        """
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for row, ids in enumerate(batch):
            if len(ids) < 2:
                continue  # nothing before the last token: every slot of this row is padding
            out = self.model(
                input_ids=torch.tensor([ids[:-1]], device=self.model.device),
                use_cache=True,
                logits_to_keep=1,  # the prefill's logits are never used; skip the vocab matmul
            )
            for i, layer in enumerate(out.cache.layers):
                if len(layers) <= i:
                    shape = (len(batch), layer.keys.shape[1], slots)
                    layers.append(
                        (
                            layer.keys.new_zeros(*shape, layer.keys.shape[-1]),
                            layer.values.new_zeros(*shape, layer.values.shape[-1]),
                        )
                    )
                keys, values = layers[i]
                keys[row, :, slots - len(ids) + 1 :] = layer.keys[0]
                values[row, :, slots - len(ids) + 1 :] = layer.values[0]
        return layers

    @contextmanager
    def _shared_prefix_context(
        self, prefix: list[tuple[torch.Tensor, torch.Tensor]], prefix_mask: torch.Tensor
    ) -> Iterator[None]:
        """Run the model with `shared_prefix_attention` over this KV prefix, then restore it."""
        AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
        AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)
        visible = prefix_mask.bool()[:, None, None, :]
        token = _shared_prefix.set([(keys, values, visible) for keys, values in prefix])
        original = self.model.config._attn_implementation
        self.model.set_attn_implementation(SHARED_PREFIX_ATTENTION)
        try:
            yield
        finally:
            self.model.set_attn_implementation(original)
            _shared_prefix.reset(token)

    def _repeated_static_cache(self, prefix: Cache, repeats: int, max_len: int) -> StaticCache:
        """The prefill's KV repeated `repeats` times into a preallocated cache.

        A DynamicCache grows by concatenation, copying every layer's whole KV once per decoded
        token; with K rows per prompt that copy was the largest single cost of a decode step. A
        StaticCache is written in place. Slots past the prefix are hidden by the causal mask.
        """
        cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        for i, layer in enumerate(prefix.layers):
            cache.update(
                layer.keys.repeat_interleave(repeats, dim=0),
                layer.values.repeat_interleave(repeats, dim=0),
                i,
            )
        return cache

    def _decode_loop(
        self,
        cache: Cache,
        *,
        last_ids: torch.Tensor,
        last_positions: torch.Tensor,
        cache_mask: torch.Tensor,
        greedy: bool,
    ) -> torch.Tensor:
        """New token ids (rows, steps), rows that stopped padded with pad ids, as generate() does.

        `cache_mask` covers the slots `cache` holds before decoding and the last prompt token
        (fed first), 0 for left padding.

        Our own loop rather than `generate`: its per-step logits processing (a full-vocabulary
        sort for top-p, stopping criteria, input bookkeeping) cost about 40% of a batch-16
        forward. Semantics follow generate: position = previous + 1, the attention mask grows by
        a 1 per step for every row, control tokens are suppressed (and stop ids until the model's
        `generation_config.min_new_tokens`) before temperature and top-p, finished rows are fed
        pad tokens and their outputs replaced by pad, and the loop ends when every row stopped.
        """
        cfg, model = self.config, self.model
        rows, width = cache_mask.shape
        max_new = cfg.max_new_tokens
        device = cache_mask.device
        pad = self.tokenizer.pad_token_id
        stops = torch.tensor(self.stop_ids, device=device)
        suppress = torch.tensor(control_token_ids(self.tokenizer), dtype=torch.long, device=device)
        min_new = model.generation_config.min_new_tokens or 0
        attention = torch.ones(rows, width + max_new, dtype=cache_mask.dtype, device=device)
        attention[:, :width] = cache_mask
        out = torch.full((rows, max_new), pad, dtype=torch.long, device=device)
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        current, position = last_ids, last_positions
        steps = 0
        for step in range(max_new):
            logits = (
                model(
                    input_ids=current[:, None],
                    attention_mask=attention[:, : width + step],
                    position_ids=position[:, None],
                    cache=cache,
                    use_cache=True,
                )
                .logits[:, -1, :]
                .float()
            )
            if suppress.numel():
                logits.index_fill_(1, suppress, -math.inf)
            if step < min_new:
                logits.index_fill_(1, stops, -math.inf)
            if greedy:
                chosen = logits.argmax(dim=-1)
            else:
                ids, probs = top_p_candidates(logits.div_(cfg.temperature), cfg.top_p)
                chosen = ids.gather(1, torch.multinomial(probs, 1)).squeeze(1)
            chosen = torch.where(unfinished, chosen, pad)
            out[:, step] = chosen
            steps = step + 1
            unfinished &= ~torch.isin(chosen, stops)
            if not unfinished.any():
                break
            current, position = chosen, position + 1
        return out[:, :steps]
