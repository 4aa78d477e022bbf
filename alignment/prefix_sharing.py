"""Prompt-shared training forwards: each shared prompt prefix is computed once per batch.

Quark/ALT trains on many (conditioned prompt, target) items per prompt: with K targets per
quantile and Q quantiles a prompt of ~300 tokens appears Q * K times next to ~20-token targets,
so the plain `[left-padded prompt | right-padded target]` batch spends most of its compute
recomputing the same prompt. Here the items of a batch are grouped by the token prefix their
prompts share (suffix placement: the whole raw prompt, only the last control token differs;
prefix placement: the whole conditioned prompt of one quantile; the bare reference prompt: the
whole prompt for every item), each prefix is run forward once with a KV cache, the cache is
repeated across the group's items inside the autograd graph, and only each item's remaining
suffix (rest of its prompt + target) is run on top.

The result is the same tensor `trainer.target_logits(model, trainer.collate(...))` returns, (b, t,
v) logits predicting each target token in the caller's item order, so `losses.quark_loss` and the
KL reference term take it unchanged; gradients of every parameter agree to float32 rounding.
The one intended difference: with dropout active, the items of a group share one dropout mask on
their common prefix (the plain batch draws one per row).
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class PrefixGroup:
    """Items whose prompts all start with the same `prefix_len` tokens.

    `prefix_len` is always shorter than every member's prompt, so each item keeps at least its
    last prompt token in its own suffix: the logits predicting its first target token then come
    out of the suffix forward, and the prefix forward needs no logits at all.
    """

    prefix_len: int
    items: tuple[int, ...]  # indices into the caller's item list, in the caller's order


@dataclass
class SharedBatch:
    """Tensors for one prompt-shared forward; see `build_shared_batch`.

    Shapes: g = groups, P = longest shared prefix, b = items, R = longest rest of a prompt after
    its group's prefix, T = longest target. Suffix rows are `[left-padded rest | right-padded
    target]`, so every item's target starts at column R and one `logits_to_keep = T + 1` slice
    serves all rows, exactly as in the unshared batch.
    """

    prefix_ids: Tensor  # (g, P), left-padded
    prefix_mask: Tensor  # (g, P)
    prefix_positions: Tensor  # (g, P): counted from the first real token, as generate() does
    item_group: Tensor  # (b,): the prefix row (group) of each item
    suffix_ids: Tensor  # (b, R + T)
    attention_mask: Tensor  # (b, P + R + T): the group's prefix mask, then the suffix mask
    suffix_positions: Tensor  # (b, R + T): continue from the group's prefix length
    labels: Tensor  # (b, T), as `trainer.collate` makes them
    label_mask: Tensor  # (b, T): 1 on real target tokens


def prompt_grouped_batches(
    keys: Sequence[Hashable], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Shuffled batches of item indices in which the items of one prompt sit next to each other.

    Sharing only pays off when a batch holds several items of one prompt; a uniform shuffle of a
    pool of many prompts almost never puts two in one batch. So prompts are shuffled, the items
    of each prompt shuffled, and the concatenation cut into batches: a prompt's items span at
    most two consecutive batches (exactly one when `batch_size` is a multiple of the items per
    prompt). The price is less diverse batches than a uniform shuffle: each batch sees about
    `batch_size / items_per_prompt` prompts, the gradient of a step is more correlated.

    Args:
        keys: one per item, equal for items of one prompt (e.g. `TrainItem.prompt`, raw).
        batch_size: items per batch, >= 1; the last batch may be shorter.
        rng: the epoch's shuffling generator.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    rng.shuffle(order)
    for members in order:
        rng.shuffle(members)
    flat = [i for members in order for i in members]
    return [flat[start : start + batch_size] for start in range(0, len(flat), batch_size)]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def group_by_shared_prefix(
    prompts: Sequence[Sequence[int]], min_fraction: float = 0.5
) -> list[PrefixGroup]:
    """Partition items into groups whose prompts share a prefix worth computing once.

    Prompts are visited in sorted token order, where any set of prompts sharing a prefix is
    contiguous and a run's common prefix is the minimum of neighbouring common prefixes. An item
    joins the current group only while the group's shared prefix stays at least `min_fraction` of
    the longest member prompt. The bound exists because suffix rows are padded to the longest
    suffix of the batch: merging two posts that share only `SUBREDDIT: r/` would save 5 tokens
    once and pad every other row to a ~300-token suffix. Items left alone form groups of one
    (prefix = their prompt minus its last token), which cost what the unshared batch costs.

    Args:
        prompts: one list of token ids per item, each non-empty.
        min_fraction: in [0, 1]; 0 merges any items sharing at least one token.

    Returns:
        Groups covering every item exactly once; members keep the caller's relative order.
    """
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))  # stable: ties keep order
    groups: list[PrefixGroup] = []
    members: list[int] = []
    shared = longest = 0
    for i in order:
        prompt = prompts[i]
        if members:
            neighbour = common_prefix_length(prompts[members[-1]], prompt)
            joined = min(shared, neighbour, len(prompt) - 1)
            joined_longest = max(longest, len(prompt))
            if joined >= 1 and joined >= min_fraction * joined_longest:
                members.append(i)
                shared, longest = joined, joined_longest
                continue
            groups.append(PrefixGroup(shared, tuple(sorted(members))))
        members, shared, longest = [i], len(prompt) - 1, len(prompt)
    if members:
        groups.append(PrefixGroup(shared, tuple(sorted(members))))
    return groups


def build_shared_batch(
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    groups: Sequence[PrefixGroup] | None = None,
    min_fraction: float = 0.5,
) -> SharedBatch:
    """Lay out a batch of items for `shared_target_logits`; items keep the caller's order.

    Positions are what the unshared left-padded batch gives each token (its index among the
    item's real tokens), so absolute (GPT-2) and rotary (GPT-J, Llama) models see the same
    inputs. Padding sits at the left of the prefix rows, and inside the suffix rows between the
    prefix and the rest of the prompt and after the target; the 2-D attention mask hides all of
    it from real tokens (an eager or SDPA attention takes any mask pattern).

    Args:
        prompts: (conditioned) prompt token ids per item.
        targets: target token ids per item (may be empty; such rows carry no label).
        pad_id: any id; padded positions are masked.
        groups: from `group_by_shared_prefix`; computed with `min_fraction` when None.
    """
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need as many prompts as targets, >= 1 ({len(prompts)}, {len(targets)})")
    if groups is None:
        groups = group_by_shared_prefix(prompts, min_fraction)
    item_group = [-1] * len(prompts)
    for g, group in enumerate(groups):
        for i in group.items:
            if item_group[i] != -1:
                raise ValueError(f"item {i} is in more than one group")
            if group.prefix_len >= len(prompts[i]):
                raise ValueError(f"group prefix {group.prefix_len} is not shorter than item {i}")
            first = prompts[group.items[0]]
            if common_prefix_length(prompts[i], first) < group.prefix_len:
                raise ValueError(f"item {i} does not start with its group's prefix")
            item_group[i] = g
    if -1 in item_group:
        raise ValueError(f"item {item_group.index(-1)} is in no group")

    width = max(group.prefix_len for group in groups)
    prefix_ids, prefix_mask = [], []
    for group in groups:
        n, left = group.prefix_len, width - group.prefix_len
        prefix_ids.append([pad_id] * left + list(prompts[group.items[0]][:n]))
        prefix_mask.append([0] * left + [1] * n)

    rests = [list(p[groups[g].prefix_len :]) for p, g in zip(prompts, item_group, strict=True)]
    r = max(len(x) for x in rests)
    t = max(max(len(y) for y in targets), 1)
    suffix_ids, suffix_mask, positions, labels, label_mask = [], [], [], [], []
    for rest, target, g in zip(rests, targets, item_group, strict=True):
        y = list(target)
        left, right = r - len(rest), t - len(y)
        start = groups[g].prefix_len
        suffix_ids.append([pad_id] * left + rest + y + [pad_id] * right)
        suffix_mask.append([0] * left + [1] * (len(rest) + len(y)) + [0] * right)
        real = list(range(start, start + len(rest) + len(y)))
        positions.append([start] * left + real + [real[-1]] * right)
        labels.append(y + [pad_id] * right)
        label_mask.append([1] * len(y) + [0] * right)
    prefix_mask_t = torch.tensor(prefix_mask, dtype=torch.long).reshape(len(groups), width)
    item_group_t = torch.tensor(item_group)
    return SharedBatch(
        prefix_ids=torch.tensor(prefix_ids, dtype=torch.long).reshape(len(groups), width),
        prefix_mask=prefix_mask_t,
        prefix_positions=(prefix_mask_t.cumsum(-1) - 1).clamp(min=0),
        item_group=item_group_t,
        suffix_ids=torch.tensor(suffix_ids),
        attention_mask=torch.cat([prefix_mask_t[item_group_t], torch.tensor(suffix_mask)], dim=1),
        suffix_positions=torch.tensor(positions),
        labels=torch.tensor(labels),
        label_mask=torch.tensor(label_mask),
    )


def shared_target_logits(model: nn.Module, batch: SharedBatch) -> Tensor:
    """Logits predicting each target token, (b, T, v) float32, in the caller's item order.

    Equals `trainer.target_logits(model, trainer.collate(prompts, targets, pad_id))` for the same
    items at every real target position; positions past an item's target are padding in both and
    are masked by `batch.label_mask`. Runs under whatever grad mode the caller set: with grad
    (policy) the prefix cache is repeated by indexing inside the graph, so each shared prefix is
    back-propagated once with the summed gradient of its items; under `torch.no_grad()` (KL
    reference) it is just a cheaper forward. Works for a model wrapped by `accelerate` and with
    frozen blocks, since it only calls the model's forward. Not with gradient checkpointing in
    training mode: transformers then drops the cache, which is detected and raised rather than
    computed wrongly.
    """
    device = next(model.parameters()).device
    cache = None
    if batch.prefix_ids.shape[1] > 0:
        prefill = model(
            input_ids=batch.prefix_ids.to(device),
            attention_mask=batch.prefix_mask.to(device),
            position_ids=batch.prefix_positions.to(device),
            use_cache=True,
            logits_to_keep=1,  # the prefix's logits are never used; skip the (P, vocab) matmul
        )
        cache = prefill.cache
        if cache is None or cache.get_seq_length() != batch.prefix_ids.shape[1]:
            # Say why, instead of failing obscurely later or running suffixes without their prompts.
            raise RuntimeError(
                "the prefix forward returned no KV cache; gradient checkpointing drops it in "
                "training mode, so disable it (or use trainer.target_logits) for shared training"
            )
        # DynamicCache indexes its key/value tensors: a differentiable gather, one row per item.
        cache.batch_select_indices(batch.item_group.to(device))
    t = batch.labels.shape[1]
    out = model(
        input_ids=batch.suffix_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.suffix_positions.to(device),
        cache=cache,
        use_cache=cache is not None,
        logits_to_keep=t + 1,
    )
    return out.logits[:, :-1].float()


def shared_prefix_target_logits(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    min_fraction: float = 0.5,
) -> tuple[Tensor, SharedBatch]:
    """Group, lay out and run one batch; returns the logits and the batch (labels, label_mask).

    A drop-in for `target_logits(model, collate(prompts, targets, pad_id))`: pass the logits with
    `batch.labels` and `batch.label_mask` to `quark_loss`.
    """
    batch = build_shared_batch(prompts, targets, pad_id, min_fraction=min_fraction)
    return shared_target_logits(model, batch), batch
