import copy
import logging

import pytest
import torch

from alignment.conditioning import add_control_tokens, condition_prompt, quantile_token
from alignment.config import SamplingConfig
from alignment.prompts import load_prompts
from samplers import HFSampler
from samplers.hf import truncate_middle

PROMPTS = [
    "SUBREDDIT: r/dogs\nTITLE: My dog ate a sock\nPOST: He is fine now.\nTL;DR:",
    "SUBREDDIT: r/jobs\nTITLE: Boss wants me in on Saturday again\nPOST: Third time this month and "
    "I already said no twice.\nTL;DR:",
    "Hello",
]


def test_k_samples_per_prompt_with_finish_reasons(tiny_model, tiny_tokenizer):
    sampler = HFSampler(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=8))
    out = sampler.sample(PROMPTS, 3, seed=0)
    assert [len(gens) for gens in out] == [3, 3, 3]
    for gens in out:
        for gen in gens:
            assert gen.finish_reason in ("stop", "length")
            assert gen.num_tokens <= 8
            if gen.finish_reason == "length":
                assert gen.num_tokens == 8


def test_finish_reason_stop_when_eos_is_forced(tiny_model, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token_id
    model = tiny_model
    bias = torch.full((len(tiny_tokenizer),), -1e4)
    bias[eos] = 0.0  # EOS is the only token left
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: o + bias)
    gens = HFSampler(model, tiny_tokenizer, SamplingConfig(max_new_tokens=8)).sample(
        PROMPTS[:1], 2, seed=0
    )[0]
    assert [(g.text, g.finish_reason, g.num_tokens) for g in gens] == [("", "stop", 0)] * 2


def test_seed_determinism(tiny_model, tiny_tokenizer):
    sampler = HFSampler(tiny_model, tiny_tokenizer, SamplingConfig(max_new_tokens=6))
    first = sampler.sample(PROMPTS, 4, seed=7)
    assert sampler.sample(PROMPTS, 4, seed=7) == first
    assert sampler.sample(PROMPTS, 4, seed=8) != first


def test_greedy_matches_transformers_generate(tiny_model, tiny_tokenizer):
    """The shared-prefill path must give what plain generate() gives (positions, padding)."""
    cfg = SamplingConfig(max_new_tokens=6, prompt_batch_size=3)
    ours = HFSampler(tiny_model, tiny_tokenizer, cfg).sample(PROMPTS, 1, seed=0, greedy=True)
    enc = tiny_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = tiny_model.generate(
            **enc, max_new_tokens=6, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id
        )
    width = enc.input_ids.shape[1]
    expected = [tiny_tokenizer.decode(r[width:], skip_special_tokens=True).strip() for r in ref]
    assert [g[0].text for g in ours] == expected


def test_never_samples_control_tokens(tiny_model, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    ids = add_control_tokens(tok, tiny_model, 3)
    bias = torch.zeros(len(tok))
    bias[ids] = 50.0  # control tokens would win every step if they were allowed
    tiny_model.get_output_embeddings().register_forward_hook(lambda m, i, o: o + bias)
    prompts = [condition_prompt(p, quantile_token(0)) for p in PROMPTS]
    out = HFSampler(tiny_model, tok, SamplingConfig(max_new_tokens=6)).sample(prompts, 4, seed=0)
    for gens in out:
        for gen in gens:
            assert "_QUANTILE_TOKEN_" not in gen.text and gen.num_tokens == 6


def test_truncate_middle_keeps_head_and_ending():
    ids = list(range(100))
    cut = truncate_middle(ids, 20, keep_tail=5)
    assert cut == list(range(15)) + list(range(95, 100))
    assert truncate_middle(ids, 200, keep_tail=5) == ids


def test_long_real_prompts_are_cut_and_reported(tiny_model, tiny_tokenizer, tldr_dev, caplog):
    rows = load_prompts(tldr_dev, limit=40)
    cfg = SamplingConfig(max_new_tokens=2, max_prompt_tokens=64, keep_tail_tokens=8)
    sampler = HFSampler(tiny_model, tiny_tokenizer, cfg)
    with caplog.at_level(logging.WARNING):
        encoded = sampler.encode_prompts([r.prompt for r in rows])
    assert max(len(e) for e in encoded) == 64
    assert "cut in the middle" in caplog.text
    ending = tiny_tokenizer("\nTL;DR:").input_ids
    assert all(e[-len(ending) :] == ending for e in encoded)


def test_invalid_num_samples(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="num_samples"):
        HFSampler(tiny_model, tiny_tokenizer, SamplingConfig()).sample(PROMPTS, 0, seed=0)
