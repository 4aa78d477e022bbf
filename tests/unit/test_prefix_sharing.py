"""Prompt-shared training forwards equal the plain `collate` + `target_logits` ones.

Loss and the gradient of every trainable parameter are compared on tiny GPT-2 (absolute
positions, tied embeddings) and GPT-J (rotary, untied) models, with control tokens at either end
of the prompt, prompts and targets of different lengths in one batch, frozen bottom blocks, an
`accelerate`-prepared model, and the no-grad KL reference forward.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from alignment.conditioning import add_control_tokens, condition_prompt, quantile_token
from alignment.losses import quark_loss, token_logprobs
from alignment.prefix_sharing import (
    PrefixGroup,
    build_shared_batch,
    common_prefix_length,
    group_by_shared_prefix,
    prompt_grouped_batches,
    shared_prefix_target_logits,
    shared_target_logits,
)
from alignment.trainer import collate, freeze_bottom_layers, target_logits, target_logprobs
from tests.conftest import DEMO_PROMPTS, build_tiny_model, build_tiny_tokenizer

ATOL, RTOL = 1e-5, 1e-4
NUM_QUANTILES = 3
Items = list[tuple[list[int], list[int], list[int]]]  # (policy prompt, reference prompt, target)


# ---- grouping ----
def test_common_prefix_length() -> None:
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([5], [1]) == 0


def test_suffix_placement_groups_each_raw_prompt() -> None:
    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 7, 8, 9]
    prompts = [a + [90], b + [91], a + [91], b + [90], a + [92]]
    groups = group_by_shared_prefix(prompts)
    assert sorted(groups, key=lambda g: g.items) == [
        PrefixGroup(len(a), (0, 2, 4)),
        PrefixGroup(len(b), (1, 3)),
    ]


def test_identical_prompts_share_all_but_their_last_token() -> None:
    """Prefix placement: only items of one quantile have the same conditioned prompt."""
    raw = [5, 6, 7, 8]
    prompts = [[90] + raw, [91] + raw, [90] + raw, [91] + raw]
    groups = group_by_shared_prefix(prompts)
    assert sorted(groups, key=lambda g: g.items) == [
        PrefixGroup(4, (0, 2)),
        PrefixGroup(4, (1, 3)),
    ]


def test_short_common_prefixes_are_not_merged() -> None:
    """Two posts sharing only a template head stay apart unless min_fraction allows it."""
    x, y = [1, 2, 3, 10, 11, 12, 13, 14], [1, 2, 3, 20, 21, 22, 23, 24]
    assert len(group_by_shared_prefix([x, y])) == 2
    assert group_by_shared_prefix([x, y], min_fraction=0.0) == [PrefixGroup(3, (0, 1))]


def test_groups_cover_every_item_once_and_share_their_prefix() -> None:
    rng = random.Random(0)
    heads = [[rng.randrange(5) for _ in range(rng.randrange(1, 6))] for _ in range(4)]
    prompts = [
        rng.choice(heads) + [rng.randrange(5) for _ in range(rng.randrange(0, 4))]
        for _ in range(40)
    ]
    prompts = [p or [0] for p in prompts]
    for fraction in (0.0, 0.5, 1.0):
        groups = group_by_shared_prefix(prompts, fraction)
        seen = sorted(i for g in groups for i in g.items)
        assert seen == list(range(len(prompts)))
        for g in groups:
            assert list(g.items) == sorted(g.items)
            assert all(g.prefix_len < len(prompts[i]) for i in g.items)
            head = prompts[g.items[0]][: g.prefix_len]
            assert all(prompts[i][: g.prefix_len] == head for i in g.items)
            if len(g.items) > 1:
                assert g.prefix_len >= max(1, fraction * max(len(prompts[i]) for i in g.items))


def test_build_rejects_inconsistent_groups() -> None:
    prompts, targets = [[1, 2, 3], [1, 4, 5]], [[7], [8]]
    with pytest.raises(ValueError, match="prefix"):
        build_shared_batch(prompts, targets, 0, groups=[PrefixGroup(2, (0, 1))])
    with pytest.raises(ValueError, match="no group"):
        build_shared_batch(prompts, targets, 0, groups=[PrefixGroup(1, (0,))])
    with pytest.raises(ValueError, match="not shorter"):
        build_shared_batch(prompts, targets, 0, groups=[PrefixGroup(3, (0,)), PrefixGroup(0, (1,))])


def test_prompt_grouped_batches_keep_each_prompt_together() -> None:
    keys = [f"post {i % 4}" for i in range(40)]  # 4 prompts, 10 items each, interleaved
    batches = prompt_grouped_batches(keys, 10, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert all(len({keys[i] for i in b}) == 1 for b in batches)
    uneven = prompt_grouped_batches(keys, 8, random.Random(0))
    assert [len(b) for b in uneven] == [8, 8, 8, 8, 8]
    assert all(len({keys[i] for i in b}) <= 2 for b in uneven)
    assert prompt_grouped_batches(keys, 10, random.Random(1)) != batches  # really shuffled
    with pytest.raises(ValueError):
        prompt_grouped_batches(keys, 0, random.Random(0))


# ---- equivalence with the plain batch ----
@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer per test: `_setup` adds control tokens to it and resizes the policy."""
    return build_tiny_tokenizer()


def _setup(family: str, tokenizer: PreTrainedTokenizerFast) -> tuple[PreTrainedModel, ...]:
    base_vocab = len(tokenizer)
    reference = build_tiny_model(family, base_vocab, tokenizer.eos_token_id, seed=1)
    policy = build_tiny_model(family, base_vocab, tokenizer.eos_token_id, seed=0)
    add_control_tokens(tokenizer, policy, NUM_QUANTILES)
    return policy, reference


def _items(tokenizer: PreTrainedTokenizerFast, placement: str) -> Items:
    """3 posts cut to different lengths, 2 targets of different lengths per quantile."""
    rows = [json.loads(line) for line in DEMO_PROMPTS.read_text().splitlines()][:3]
    items: Items = []
    for n, (row, cut) in enumerate(zip(rows, (15, 40, 27), strict=True)):
        prompt = tokenizer.decode(tokenizer(row["post"])["input_ids"][:cut])
        words = row["summary"].split()
        for k in range(NUM_QUANTILES):
            conditioned = condition_prompt(prompt, quantile_token(k), placement)  # type: ignore[arg-type]
            policy_ids = tokenizer(conditioned)["input_ids"]
            ref_ids = tokenizer(prompt)["input_ids"]
            for length in (3 + n + k, 9 + 2 * n):
                target = tokenizer(" " + " ".join(words[:length]))["input_ids"][: 4 + length]
                items.append((policy_ids, ref_ids, target + [tokenizer.eos_token_id]))
    return items


def _loss(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    items: Items,
    pad: int,
    shared: bool,
    min_fraction: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quark_loss with entropy and KL, as the trainer's step computes it; returns both logits."""
    prompts, refs = [p for p, _, _ in items], [r for _, r, _ in items]
    targets = [t for _, _, t in items]
    if shared:
        logits, batch = shared_prefix_target_logits(policy, prompts, targets, pad, min_fraction)
        with torch.no_grad():
            ref_logits, _ = shared_prefix_target_logits(reference, refs, targets, pad, min_fraction)
    else:
        batch = collate(prompts, targets, pad)
        logits = target_logits(policy, batch)
        with torch.no_grad():
            ref_logits = target_logits(reference, collate(refs, targets, pad))
    loss, _ = quark_loss(
        logits,
        batch.labels,
        batch.label_mask,
        entropy_coef=0.06,
        kl_coef=0.05,
        ref_logits=ref_logits,
        num_added_tokens=logits.shape[-1] - ref_logits.shape[-1],
    )
    return loss, logits, ref_logits


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
    }


def _assert_same_training_signal(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    items: Items,
    pad: int,
    min_fraction: float = 0.5,
) -> None:
    results = []
    for shared in (False, True):
        policy.zero_grad(set_to_none=True)
        loss, logits, ref_logits = _loss(policy, reference, items, pad, shared, min_fraction)
        loss.backward()
        results.append((loss.detach(), logits.detach(), ref_logits, _grads(policy)))
    (loss_a, logits_a, ref_a, grads_a), (loss_b, logits_b, ref_b, grads_b) = results
    mask = collate([p for p, _, _ in items], [t for _, _, t in items], pad).label_mask.bool()
    torch.testing.assert_close(logits_b[mask], logits_a[mask], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ref_b[mask], ref_a[mask], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(loss_b, loss_a, atol=ATOL, rtol=RTOL)
    assert grads_a.keys() == grads_b.keys()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable
    for name, grad in grads_a.items():
        if name not in trainable:
            assert grad is None and grads_b[name] is None, name
            continue
        assert grad is not None and grads_b[name] is not None, name
        assert grad.abs().max() > 0, name  # the comparison below is not between zeros
        torch.testing.assert_close(grads_b[name], grad, atol=ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
@pytest.mark.parametrize("placement", ["prefix", "suffix"])
@pytest.mark.parametrize("unfrozen_ratio", [1.0, 0.5])
def test_loss_and_gradients_match_plain_batch(
    tokenizer: PreTrainedTokenizerFast, family: str, placement: str, unfrozen_ratio: float
) -> None:
    policy, reference = _setup(family, tokenizer)
    frozen, _ = freeze_bottom_layers(policy, unfrozen_ratio)
    assert frozen == (0 if unfrozen_ratio == 1.0 else 1)
    items = _items(tokenizer, placement)
    random.Random(1).shuffle(items)  # groups need not be contiguous in the batch
    _assert_same_training_signal(policy, reference, items, tokenizer.pad_token_id)


def test_accelerate_prepared_model_matches(tokenizer: PreTrainedTokenizerFast) -> None:
    policy, reference = _setup("gptj", tokenizer)
    freeze_bottom_layers(policy, 0.5)
    prepared = Accelerator(cpu=True).prepare(policy)
    _assert_same_training_signal(
        prepared, reference, _items(tokenizer, "suffix"), tokenizer.pad_token_id
    )


def test_mixed_groups_singletons_and_empty_targets(tokenizer: PreTrainedTokenizerFast) -> None:
    """A one-token prompt (no prefix at all) and an empty target next to shared groups."""
    policy, reference = _setup("gpt2", tokenizer)
    items = _items(tokenizer, "suffix")[:5]
    eos = tokenizer.eos_token_id
    items += [([7], [7], [8, 9, eos]), ([7, 8, 9, 10], [7, 8, 9, 10], [])]
    groups = group_by_shared_prefix([p for p, _, _ in items])
    assert PrefixGroup(0, (5,)) in groups
    _assert_same_training_signal(policy, reference, items, tokenizer.pad_token_id)


@pytest.mark.parametrize("family", ["gpt2", "gptj"])
def test_partly_shared_prompts_with_rests_of_different_lengths(
    tokenizer: PreTrainedTokenizerFast, family: str
) -> None:
    """Prompts that share only a head: the rests (1 to 15 tokens) are padded inside the rows."""
    policy, reference = _setup(family, tokenizer)
    freeze_bottom_layers(policy, 0.5)
    head = tokenizer(DEMO_PROMPTS.read_text()[:400])["input_ids"][:20]
    eos = tokenizer.eos_token_id
    tails = [[], [30, 31, 32], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53], [60]]
    items: Items = [
        (head + tail + [eos], head + tail + [eos], [70 + n, 71, 72][: 1 + n % 3] + [eos])
        for n, tail in enumerate(tails * 2)
    ]
    batch = build_shared_batch([p for p, _, _ in items], [t for _, _, t in items], eos, None, 0.0)
    assert batch.prefix_ids.shape[0] == 1  # one group: the 20-token head
    assert batch.suffix_ids.shape[1] - batch.labels.shape[1] == 15  # the longest rest
    _assert_same_training_signal(policy, reference, items, eos, min_fraction=0.0)


def test_gradient_checkpointing_is_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    """transformers drops the cache under checkpointing; that must raise, not mislead."""
    policy, _ = _setup("gpt2", tokenizer)
    policy.gradient_checkpointing_enable()
    policy.train()
    items = _items(tokenizer, "suffix")
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        shared_prefix_target_logits(
            policy, [p for p, _, _ in items], [t for _, _, t in items], tokenizer.pad_token_id
        )


def test_reference_forward_shares_one_prefix_per_post(tokenizer: PreTrainedTokenizerFast) -> None:
    """The no-grad path really shares: far fewer token positions reach the model."""
    _, reference = _setup("gptj", tokenizer)
    items = _items(tokenizer, "prefix")
    refs, targets = [r for _, r, _ in items], [t for _, _, t in items]
    fed: list[int] = []
    hook = reference.register_forward_pre_hook(
        lambda _m, _a, kwargs: fed.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            batch = build_shared_batch(refs, targets, tokenizer.pad_token_id)
            shared = shared_target_logits(reference, batch)
            fed_shared = sum(fed)
            fed.clear()
            plain_batch = collate(refs, targets, tokenizer.pad_token_id)
            plain = target_logits(reference, plain_batch)
            fed_plain = sum(fed)
    finally:
        hook.remove()
    assert batch.prefix_ids.shape[0] == 3  # one prefix per post, whatever the quantile
    assert not shared.requires_grad
    assert fed_shared < fed_plain / 2
    mask = plain_batch.label_mask.bool()
    torch.testing.assert_close(shared[mask], plain[mask], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("batch_size", [4, 64])
def test_target_logprobs_equal_the_plain_forward(
    tokenizer: PreTrainedTokenizerFast, batch_size: int
) -> None:
    """Evaluation's and PPO's log-probabilities (prompts repeated K times in a row, batches that
    cut a prompt's samples apart) equal the plain forward's, target token by target token."""
    _, reference = _setup("gptj", tokenizer)
    items = _items(tokenizer, "prefix")
    refs, targets = [r for _, r, _ in items], [t for _, _, t in items]
    shared = target_logprobs(reference, refs, targets, tokenizer.pad_token_id, batch_size)
    with torch.no_grad():
        batch = collate(refs, targets, tokenizer.pad_token_id)
        plain = token_logprobs(target_logits(reference, batch), batch.labels)
    assert [len(row) for row in shared] == [len(t) for t in targets]
    for i, row in enumerate(shared):
        torch.testing.assert_close(row, plain[i, : len(targets[i])], atol=ATOL, rtol=RTOL)
