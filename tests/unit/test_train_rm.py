"""Tests for rewards.train_rm: data handling by hand, training on a tiny random BERT and GPT-2."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerBase,
)

from alignment.errors import UserError
from experiments.cli import main
from rewards.base import encode_summary
from rewards.train_rm import (
    METRICS_FILE,
    Pair,
    evaluate,
    load_pairs,
    load_rm_tokenizer,
    mean_margin,
    pairwise_accuracy,
    split_pairs,
    train,
)

WORDS = "apple river stone cloud green table music window paper light road horse".split()


def _row(i: int, post: str | None = "p", **over: object) -> dict[str, object]:
    row: dict[str, object] = {
        "prompt": f"POST: {i}\nTL;DR:",
        "chosen": f"c{i}",
        "rejected": f"r{i}",
    }
    if post is not None:
        row["post_id"] = f"{post}{i}"
    row.update(over)
    return row


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _synthetic_rows(n: int, seed: int) -> list[dict[str, object]]:
    """Learnable: the chosen summary ends with the marker `excellent`, the rejected one does not."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        post = " ".join(rng.choices(WORDS, k=12))
        summary = " ".join(rng.choices(WORDS, k=4))
        rows.append(
            {
                "post_id": f"t3_{i // 2}",  # two pairs per post, so the split is by post
                "prompt": f"SUBREDDIT: r/test\nTITLE: post {i}\nPOST: {post}\nTL;DR:",
                "chosen": f"{summary} excellent",
                "rejected": summary,
            }
        )
    return rows


# ---- load_pairs ----
def test_load_pairs_reads_groups_and_drops_identical(tmp_path: Path) -> None:
    rows = [_row(0), _row(1, post=None), _row(2, chosen="same", rejected=" same ")]
    pairs, dropped = load_pairs(_write(tmp_path / "p.jsonl", rows))
    assert dropped == 1
    assert pairs == [
        Pair("POST: 0\nTL;DR:", "c0", "r0", "post:p0"),
        Pair("POST: 1\nTL;DR:", "c1", "r1", "line:2"),
    ]


def test_load_pairs_max_pairs_keeps_the_first(tmp_path: Path) -> None:
    pairs, _ = load_pairs(_write(tmp_path / "p.jsonl", [_row(i) for i in range(5)]), max_pairs=3)
    assert [p.chosen for p in pairs] == ["c0", "c1", "c2"]


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_load_pairs_missing_field_names_file_line_field(tmp_path: Path, field: str) -> None:
    bad = _row(1)
    del bad[field]
    path = _write(tmp_path / "p.jsonl", [_row(0), bad])
    with pytest.raises(UserError, match=rf"p\.jsonl:2:{field}: missing field"):
        load_pairs(path)


def test_load_pairs_non_string_field(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [_row(0, chosen=3)])
    with pytest.raises(UserError, match=r"p\.jsonl:1:chosen: expected a string, got int"):
        load_pairs(path)


def test_load_pairs_too_few_usable(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.jsonl", [_row(0), _row(1, chosen="x", rejected="x")])
    with pytest.raises(UserError, match=r"1 usable pair\(s\), need at least 2 \(1 dropped"):
        load_pairs(path)


# ---- split_pairs ----
def test_split_by_post_never_shares_a_post() -> None:
    pairs = [Pair("p", f"c{i}", "r", f"post:{i % 7}") for i in range(40)]
    train_pairs, eval_pairs = split_pairs(pairs, 0.3, seed=0)
    assert {p.group for p in train_pairs}.isdisjoint({p.group for p in eval_pairs})
    assert len(train_pairs) + len(eval_pairs) == 40
    assert len({p.group for p in eval_pairs}) == 2  # round(0.3 * 7)
    assert split_pairs(pairs, 0.3, seed=0) == (train_pairs, eval_pairs)  # deterministic
    # The split does not depend on row order.
    shuffled = sorted(pairs, key=lambda p: p.chosen[::-1])
    assert {p.group for p in split_pairs(shuffled, 0.3, seed=0)[1]} == {p.group for p in eval_pairs}


def test_split_seed_changes_split_and_keeps_both_sides() -> None:
    pairs = [Pair("p", f"c{i}", "r", f"line:{i}") for i in range(30)]
    splits = {tuple(p.group for p in split_pairs(pairs, 0.1, seed=s)[1]) for s in range(5)}
    assert len(splits) > 1
    train_pairs, eval_pairs = split_pairs(pairs[:2], 0.01, seed=0)  # rounds to 0: still 1 held out
    assert len(train_pairs) == len(eval_pairs) == 1


def test_split_single_post_is_an_error() -> None:
    with pytest.raises(UserError, match="one post"):
        split_pairs([Pair("p", "a", "b", "post:x"), Pair("p", "c", "d", "post:x")], 0.5, seed=0)


# ---- encode ----
@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_rm_tokenizer("embedded:minilm-l6")


def test_encode_short_text_is_plain_tokenization(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = "SUBREDDIT: r/test\nTITLE: hi\nPOST: a short post\nTL;DR:"
    ids = encode_summary(tokenizer, prompt, "a summary", 64)
    assert ids == tokenizer(prompt + " " + "a summary")["input_ids"]


def test_encode_long_post_keeps_head_tldr_and_summary(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = "SUBREDDIT: r/test\nTITLE: my title\nPOST: " + "word " * 400 + "\nTL;DR:"
    ids = encode_summary(tokenizer, prompt, "the cat sat on the mat", 48)
    assert len(ids) == 48
    text = tokenizer.decode(ids)
    assert text.startswith("[CLS] subreddit : r / test title : my title post : word")
    assert text.endswith("tl ; dr : the cat sat on the mat [SEP]")


def test_encode_overlong_summary_keeps_its_end(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = encode_summary(tokenizer, "POST: x\nTL;DR:", "word " * 100 + "end", 16)
    assert len(ids) == 16
    assert tokenizer.decode(ids).endswith("word end [SEP]")


# ---- accuracy ----
def test_pairwise_accuracy_and_margin_by_hand() -> None:
    # wins: 2>1 yes, 0>0 tie (wrong), 1>3 no, 5>-1 yes -> 2/4
    assert pairwise_accuracy([2, 0, 1, 5], [1, 0, 3, -1]) == 0.5
    # diffs 1, 0, -2, 6 -> mean 1.25
    assert mean_margin([2, 0, 1, 5], [1, 0, 3, -1]) == 1.25
    with pytest.raises(ValueError):
        pairwise_accuracy([], [])
    with pytest.raises(ValueError):
        pairwise_accuracy([1.0], [1.0, 2.0])


# ---- tiny models ----
def _tiny_bert(folder: Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tokenizer)


def _cli(pairs: Path, model: Path, output: Path, *extra: str) -> int:
    return main(
        [
            "train-rm",
            "--pairs",
            str(pairs),
            "--model",
            str(model),
            "--output",
            str(output),
            "--max-length",
            "64",
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            *extra,
        ]
    )


def test_cli_trains_bert_and_writes_folder(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", _synthetic_rows(96, seed=1))
    output = tmp_path / "out" / "rm"
    assert _cli(pairs, tiny_bert, output, "--epochs", "3", "--eval-fraction", "0.25") == 0
    metrics = json.loads((output / METRICS_FILE).read_text())
    assert metrics["split_by"] == "post_id"
    assert metrics["train_pairs"] + metrics["eval_pairs"] == 96
    assert metrics["eval_pairs"] == 24  # 12 of 48 posts, 2 pairs each
    assert metrics["accuracy_after"] >= 0.9
    assert metrics["margin_after"] > metrics["margin_before"]
    assert (output / "model.safetensors").is_file()
    assert (output / "tokenizer_config.json").is_file()
    assert not (output / "trainer").exists()
    assert output.stat().st_mode & 0o077  # not left private like the mkdtemp folder
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["rm"]  # no temp folder left
    assert "held-out pairwise accuracy" in capsys.readouterr().out


def test_train_gpt2_backbone_learns(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """A causal backbone scores at the last non-pad token: the same code path must learn there."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2ForSequenceClassification(config)
    pairs = [
        Pair(str(r["prompt"]), str(r["chosen"]), str(r["rejected"]), "x")
        for r in _synthetic_rows(80, seed=2)
    ]
    encoded = [
        (
            encode_summary(tokenizer, p.prompt, p.chosen, 64),
            encode_summary(tokenizer, p.prompt, p.rejected, 64),
        )
        for p in pairs
    ]
    args = argparse.Namespace(epochs=3, batch_size=8, lr=1e-3, max_length=64, seed=0)
    before = evaluate(model, encoded[64:], tokenizer, 8)
    loss = train(model, tokenizer, encoded[:64], args, tmp_path / "work")
    after = evaluate(model, encoded[64:], tokenizer, 8)
    assert loss == loss and loss < 0.7  # finite, below log(2) = chance
    assert after[0] >= 0.9 and after[1] > before[1]


# ---- bad input through the CLI: exit 2, a clear message, nothing at --output ----
@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (None, "no such file"),
        ("{bad json\n", "pairs.jsonl:1: malformed JSON"),
        ([{"prompt": "p", "chosen": "c"}], "pairs.jsonl:1:rejected: missing field"),
        ([{"chosen": "c", "rejected": "r"}], "pairs.jsonl:1:prompt: missing field"),
        ([{"prompt": "p", "rejected": "r"}], "pairs.jsonl:1:chosen: missing field"),
        ([_row(0), _row(1, chosen="x", rejected="x")], "1 usable pair(s), need at least 2"),
    ],
)
def test_cli_bad_input_exits_2(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str], rows: object, message: str
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    if isinstance(rows, str):
        pairs.write_text(rows)
    elif isinstance(rows, list):
        _write(pairs, rows)
    output = tmp_path / "out"
    assert _cli(pairs, tiny_bert, output) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval-fraction", "1"], "--eval-fraction must be in (0, 1)"),
        (["--max-length", "512"], "exceeds the model's 128 positions"),
    ],
)
def test_cli_bad_options_exit_2(
    tmp_path: Path,
    tiny_bert: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", _synthetic_rows(8, seed=0))
    output = tmp_path / "out"
    assert _cli(pairs, tiny_bert, output, *extra) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_cli_refuses_existing_output(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = _write(tmp_path / "pairs.jsonl", _synthetic_rows(8, seed=0))
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("x")
    assert _cli(pairs, tiny_bert, output) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
