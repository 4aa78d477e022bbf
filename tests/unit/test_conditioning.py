import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.conditioning import (
    CONDITIONING_FILE,
    Conditioning,
    add_control_tokens,
    condition_prompt,
    control_token_ids,
    quantile_token,
    strip_condition,
)
from alignment.errors import UserError

PROMPT = "SUBREDDIT: r/dogs\nTITLE: a sock\nPOST: he ate it.\nTL;DR:"


def test_condition_and_strip_are_inverse():
    for k in (0, 3, 12):
        token = quantile_token(k)
        prefixed = condition_prompt(PROMPT, token, "prefix")
        assert (
            prefixed
            == f"_QUANTILE_TOKEN_{k}_SUBREDDIT: r/dogs\nTITLE: a sock\nPOST: he ate it.\nTL;DR:"
        )
        suffixed = condition_prompt(PROMPT, token, "suffix")
        assert suffixed.endswith("TL;DR:" + token)
        for text in (prefixed, suffixed):
            assert strip_condition(text) == PROMPT
            assert strip_condition(text, token) == PROMPT
    assert strip_condition(PROMPT) == PROMPT
    feedback = "Excellent. input: "
    assert strip_condition(condition_prompt(PROMPT, feedback), feedback) == PROMPT


def test_add_tokens_resizes_and_initialises(tiny_model, tiny_tokenizer):
    tok = _copy_tokenizer(tiny_tokenizer)
    old_rows = tiny_model.get_input_embeddings().weight.shape[0]
    old_input = tiny_model.get_input_embeddings().weight.detach().clone()
    ids = add_control_tokens(tok, tiny_model, 5, seed=0)
    assert ids == list(range(old_rows, old_rows + 5))
    assert control_token_ids(tok) == ids
    emb = tiny_model.get_input_embeddings().weight
    assert emb.shape[0] == old_rows + 5
    assert torch.equal(emb[:old_rows], old_input)  # existing rows untouched
    new = emb[ids]
    # rows are drawn per dimension from N(mean_d, std_d) of the old rows: no zeros, same scale
    assert new.abs().min() > 0
    assert abs(new.std().item() - old_input.std().item()) < 0.5 * old_input.std().item()
    out = tiny_model.get_output_embeddings().weight
    if out is not emb:  # untied (GPT-J): output rows set explicitly, not left at zero
        assert out.shape[0] == old_rows + 5 and out[ids].abs().min() > 0
    # single token each, and the tokenizer never splits them
    text = condition_prompt(PROMPT, quantile_token(2))
    assert tok(text).input_ids[0] == ids[2]


def test_add_tokens_is_idempotent(tiny_model, tiny_tokenizer):
    tok = _copy_tokenizer(tiny_tokenizer)
    ids = add_control_tokens(tok, tiny_model, 5, seed=0)
    snapshot = tiny_model.get_input_embeddings().weight.detach().clone()
    assert add_control_tokens(tok, tiny_model, 5, seed=1) == ids
    assert len(tok) == ids[-1] + 1
    assert torch.equal(tiny_model.get_input_embeddings().weight, snapshot)


def test_save_load_keeps_ids_and_rows(tmp_path, tiny_model, tiny_tokenizer):
    tok = _copy_tokenizer(tiny_tokenizer)
    ids = add_control_tokens(tok, tiny_model, 3)
    tiny_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert control_token_ids(tok2) == ids
    assert torch.equal(
        model2.get_input_embeddings().weight, tiny_model.get_input_embeddings().weight
    )
    assert torch.equal(
        model2.get_output_embeddings().weight, tiny_model.get_output_embeddings().weight
    )
    assert add_control_tokens(tok2, model2, 3) == ids


def _copy_tokenizer(tok):
    import copy

    return copy.deepcopy(tok)


def test_conditioning_strategy_tokens_and_text(tiny_model, tiny_tokenizer, tmp_path):
    """One object conditions prompts for sampling, training and inference, and survives a save."""
    tokens = Conditioning.quantile_tokens(3, "suffix")
    assert tokens.best == "_QUANTILE_TOKEN_0_"
    assert tokens.condition(PROMPT) == PROMPT + "_QUANTILE_TOKEN_0_"
    assert tokens.condition(PROMPT, 2) == PROMPT + "_QUANTILE_TOKEN_2_"
    with pytest.raises(ValueError, match="outside"):
        tokens.condition(PROMPT, 3)
    tok = _copy_tokenizer(tiny_tokenizer)
    assert not tokens.is_ready(tok)
    tokens.prepare(tok, tiny_model, seed=0)
    assert tokens.is_ready(tok) and len(control_token_ids(tok)) == 3
    tokens.save(tmp_path)
    assert Conditioning.load(tmp_path, tok) == tokens
    with pytest.raises(UserError, match="tokenizer lacks _QUANTILE_TOKEN_0_"):
        Conditioning.load(tmp_path, tiny_tokenizer)  # saved tokens the tokenizer does not have
    # text controls (ALT) add nothing to the vocabulary
    text = Conditioning("text", ("Excellent. input: ", "Bad. input: "))
    size = len(tok)
    text.prepare(tok, tiny_model, seed=0)
    assert len(tok) == size and text.is_ready(tok)
    assert text.condition(PROMPT, 1) == "Bad. input: " + PROMPT


def test_conditioning_of_checkpoints_without_a_file(tmp_path, tiny_model, tiny_tokenizer):
    """Older checkpoints (and ALT's) have tokens but no conditioning.json: ALT's prefix layout."""
    tok = _copy_tokenizer(tiny_tokenizer)
    assert Conditioning.load(tmp_path, tok) is None
    add_control_tokens(tok, tiny_model, 4)
    assert Conditioning.load(tmp_path, tok) == Conditioning.quantile_tokens(4, "prefix")
    (tmp_path / CONDITIONING_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not a valid conditioning file"):
        Conditioning.load(tmp_path, tok)
