"""HFSampler's own decode loop: exact top-p, shared-prefix attention, generate's semantics."""

import math

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

import samplers.hf as hf
from alignment.config import SamplingConfig
from samplers import HFSampler
from samplers.hf import shared_prefix_attention, top_p_candidates

PROMPTS = [
    "SUBREDDIT: r/dogs\nTITLE: My dog ate a sock\nPOST: He is fine now.\nTL;DR:",
    "SUBREDDIT: r/jobs\nTITLE: Boss wants me in on Saturday again\nPOST: Third time this month and "
    "I already said no twice.\nTL;DR:",
    "Hello there",
]


def reference_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Full-vocabulary top-p probabilities, one token at a time over a full sort.

    Walk the tokens from most to least likely, keeping each while the kept mass is below top_p;
    then keep every token exactly as likely as the least likely kept one (ties all in), and
    renormalise.
    """
    probs = torch.softmax(logits.double(), dim=-1)
    out = torch.zeros_like(probs)
    for row, p in enumerate(probs.tolist()):
        kept, mass = [], 0.0
        for token in sorted(range(len(p)), key=lambda t: -p[t]):
            if mass >= top_p:
                break
            kept.append(token)
            mass += p[token]
        least = min(p[t] for t in kept)
        for token, prob in enumerate(p):
            if prob >= least:
                out[row, token] = prob
    return (out / out.sum(dim=-1, keepdim=True)).float()


def as_full(ids: torch.Tensor, probs: torch.Tensor, vocab: int) -> torch.Tensor:
    assert ids.shape == probs.shape
    return torch.zeros(ids.shape[0], vocab).scatter_add(1, ids, probs)


def assert_same_nucleus(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(got > 0, want > 0), "kept sets differ"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("scale", [0.3, 2.0, 6.0])
def test_top_p_equals_full_sort_reference(top_p, scale):
    gen = torch.Generator().manual_seed(int(top_p * 100) + int(scale * 10))
    logits = torch.randn(32, 40, generator=gen) * scale
    ids, probs = top_p_candidates(logits, top_p, shortlists=(3, 8))
    assert_same_nucleus(as_full(ids, probs, 40), reference_top_p(logits, top_p))


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_top_p_matches_transformers_warper_without_ties(top_p):
    """Away from exact ties the kept set and probabilities are generate's own."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)) * 3
    ids, probs = top_p_candidates(logits, top_p, shortlists=(16,))
    warped = TopPLogitsWarper(top_p)(None, logits.clone())
    assert_same_nucleus(as_full(ids, probs, 300), torch.softmax(warped, dim=-1))


def test_top_p_keeps_every_tie_at_the_boundary():
    # p0 > p1 = p2 = p3 = p4 > rest; top_p ends inside the tied run (after token 2 by rank).
    logits = torch.tensor([[4.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, -1.0]])
    p = torch.softmax(logits, dim=-1)[0]
    top_p = float(p[0] + 1.5 * p[1])
    ref = reference_top_p(logits, top_p)
    assert (ref[0] > 0).tolist() == [True] * 5 + [False] * 3
    for shortlists in [(2,), (3,), (5,), (6,), ()]:  # tie run cut by, ending at, inside shortlist
        ids, probs = top_p_candidates(logits, top_p, shortlists=shortlists)
        assert_same_nucleus(as_full(ids, probs, 8), ref)


def test_top_p_falls_back_to_full_sort_when_the_shortlist_is_short_of_top_p():
    flat = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 0.1
    peaked = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 8
    logits = torch.cat([peaked, flat])
    ids, probs = top_p_candidates(logits, 0.9, shortlists=(4, 8))
    kept = (probs > 0).sum(dim=-1)
    assert kept[4:].min() > 8  # the flat rows needed more than every shortlist holds
    assert_same_nucleus(as_full(ids, probs, 50), reference_top_p(logits, 0.9))


def test_top_p_one_is_the_plain_softmax():
    logits = torch.randn(3, 20)
    ids, probs = top_p_candidates(logits, 1.0)
    torch.testing.assert_close(as_full(ids, probs, 20), torch.softmax(logits, dim=-1))


def chi_square_bound(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square(df), Wilson-Hilferty approximation."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def test_sampling_from_the_candidates_follows_the_exact_nucleus():
    logits = torch.tensor([[2.0, 1.6, 1.5, 1.0, 0.7, 0.2, -0.5, -1.0, -2.0, -3.0]])
    exact = reference_top_p(logits, 0.8)[0].double()
    draws = 40_000
    torch.manual_seed(0)
    ids, probs = top_p_candidates(logits.expand(draws, -1), 0.8)
    tokens = ids.gather(1, torch.multinomial(probs, 1)).squeeze(1)
    counts = torch.bincount(tokens, minlength=10).double()
    assert counts[exact == 0].sum() == 0  # never a token outside the nucleus
    kept = exact > 0

    def chi_square(p: torch.Tensor) -> float:
        expected = draws * p[kept]
        return float(((counts[kept] - expected) ** 2 / expected).sum())

    bound = chi_square_bound(int(kept.sum()) - 1)
    assert chi_square(exact) < bound
    # The test has the power to see a plausible mistake: the untruncated softmax restricted to
    # the same tokens (not renormalised after dropping one more or one fewer token) is off.
    one_more = torch.softmax(logits[0].double(), dim=-1)
    one_more[~kept] = 0
    one_more[int(kept.sum()) - 1] = 0
    assert chi_square(one_more / one_more.sum()) > bound


class _Layer(torch.nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx


@pytest.mark.parametrize("kv_heads,heads", [(2, 6), (3, 3)])
def test_shared_prefix_attention_equals_sdpa_over_the_repeated_cache(kv_heads, heads):
    torch.manual_seed(0)
    prompts, samples, prefix, slots, dim = 3, 4, 7, 5, 8
    rows = prompts * samples
    key_p, value_p = torch.randn(2, prompts, kv_heads, prefix, dim)
    prefix_mask = torch.ones(prompts, prefix, dtype=torch.bool)
    prefix_mask[1, :3] = False  # left padding
    prefix_mask[2, :] = False  # a prompt whose prefix is all padding
    key_s, value_s = torch.randn(2, rows, kv_heads, slots, dim)
    query = torch.randn(rows, heads, 1, dim)
    seen = 3  # generated slots visible so far; the rest of the static cache is empty
    suffix_mask = torch.zeros(rows, 1, 1, slots, dtype=torch.bool)
    suffix_mask[..., :seen] = True
    token = hf._shared_prefix.set([None, (key_p, value_p, prefix_mask[:, None, None, :])])
    try:
        got, _ = shared_prefix_attention(_Layer(1), query, key_s, value_s, suffix_mask)
    finally:
        hf._shared_prefix.reset(token)
    keys = torch.cat([key_p.repeat_interleave(samples, 0), key_s], dim=2)
    values = torch.cat([value_p.repeat_interleave(samples, 0), value_s], dim=2)
    mask = torch.cat([prefix_mask.repeat_interleave(samples, 0)[:, None, None], suffix_mask], -1)
    rep = heads // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1), attn_mask=mask
    )
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-5)


def _generate_reference(model, tokenizer, prompts, max_new_tokens):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    width = enc.input_ids.shape[1]
    return [tokenizer.decode(r[width:], skip_special_tokens=True).strip() for r in ref]


@pytest.mark.parametrize("share_prefix", [True, False])
def test_greedy_k_samples_all_match_generate(tiny_model, tiny_tokenizer, share_prefix, monkeypatch):
    """Every one of K rows per prompt continues its own prompt, both cache layouts."""
    sampler = HFSampler(
        tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=12, prompt_batch_size=3)
    )
    assert sampler._can_share_prefix()  # GPT-2 and GPT-J go through the AttentionInterface
    monkeypatch.setattr(sampler, "_can_share_prefix", lambda: share_prefix)
    out = sampler.sample(PROMPTS, 3, seed=0, greedy=True)
    expected = _generate_reference(tiny_model, tiny_tokenizer, PROMPTS, 12)
    assert len(set(expected)) > 1  # outputs depend on the prompt
    assert [[g.text for g in gens] for gens in out] == [[e] * 3 for e in expected]
    assert tiny_model.config._attn_implementation == "sdpa"  # restored after decoding


def test_attention_implementation_restored_after_an_error(tiny_model, tiny_tokenizer):
    sampler = HFSampler(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=4))
    calls = []

    def fail_on_decode(_module, args, kwargs):
        calls.append(kwargs["input_ids"].shape[1])
        if kwargs["input_ids"].shape[1] == 1:
            raise RuntimeError("boom")

    tiny_model.register_forward_pre_hook(fail_on_decode, with_kwargs=True)
    with pytest.raises(RuntimeError, match="boom"):
        sampler.sample(PROMPTS[:1], 2, seed=0)
    assert calls[-1] == 1
    assert tiny_model.config._attn_implementation == "sdpa"


def _force_eos(model, tokenizer):
    bias = torch.full((len(tokenizer),), -1e4)
    bias[tokenizer.eos_token_id] = 0.0  # EOS is the only token left
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: o + bias)


def test_stops_early_when_every_row_has_stopped(tiny_model, tiny_tokenizer):
    _force_eos(tiny_model, tiny_tokenizer)
    decode_calls = []
    tiny_model.register_forward_pre_hook(
        lambda m, a, kw: decode_calls.append(1) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True,
    )
    sampler = HFSampler(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=16))
    out = sampler.sample(PROMPTS, 4, seed=0)
    assert all(g.finish_reason == "stop" and g.num_tokens == 0 for gens in out for g in gens)
    assert len(decode_calls) == 1


def test_min_new_tokens_from_generation_config_holds_back_stops(tiny_model, tiny_tokenizer):
    """Like generate, stop ids are suppressed until generation_config.min_new_tokens."""
    _force_eos(tiny_model, tiny_tokenizer)
    tiny_model.generation_config.min_new_tokens = 5
    sampler = HFSampler(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=16))
    for greedy in (True, False):
        out = sampler.sample(PROMPTS, 2, seed=0, greedy=greedy)
        assert all(g.finish_reason == "stop" and g.num_tokens == 5 for gens in out for g in gens)


def test_rows_that_stopped_are_padded_while_others_go_on(tiny_model, tiny_tokenizer):
    """A row that stops is fed and given pad ids; the others keep their own continuation."""
    sampler = HFSampler(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=8))
    eos = tiny_tokenizer.eos_token_id
    rows = 6
    # Row r may emit EOS only at its step r (EOS banned before, and forced then).
    step = {"n": 0}

    def steer(_module, _inputs, logits):
        if logits.shape[0] != rows:  # the prefill (one prompt row)
            return logits
        logits = logits.clone()
        logits[..., eos] = -1e4
        r = step["n"]
        if r < rows:
            logits[r, 0, :] = -1e4
            logits[r, 0, eos] = 0.0
        step["n"] += 1
        return logits

    tiny_model.get_output_embeddings().register_forward_hook(steer)
    gens = sampler.sample(PROMPTS[:1], rows, seed=0, greedy=True)[0]
    assert [(g.finish_reason, g.num_tokens) for g in gens] == [("stop", r) for r in range(rows)]


def test_a_model_in_training_mode_keeps_its_own_attention(tiny_model, tiny_tokenizer):
    """shared_prefix_attention applies no dropout, so a training-mode model repeats the cache."""
    sampler = HFSampler(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=3))
    assert sampler._can_share_prefix()
    tiny_model.train()
    assert not sampler._can_share_prefix()
