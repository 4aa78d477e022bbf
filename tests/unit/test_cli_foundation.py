"""`quark-alt sample` / `generate` end to end on a tiny saved model, and every bad input."""

import json

import pytest

from alignment.records import load_samples
from experiments.cli import main

GOOD_ROW = {
    "id": "p1",
    "subreddit": "dogs",
    "title": "My dog ate a sock",
    "post": "He is fine now but the vet cost a lot.",
    "summary": "dog ate sock",
}


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_sample_writes_alt_format(tmp_path, tiny_model_dir):
    prompts = write(
        tmp_path / "p.jsonl",
        [json.dumps(GOOD_ROW), json.dumps({"prompt": "Hello there", "label": "x"})],
    )
    out = tmp_path / "s.jsonl"
    rc = main(
        [
            "sample",
            "--model",
            str(tiny_model_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "-k",
            "3",
            "--max-new-tokens",
            "5",
            "--iteration",
            "1",
        ]
    )
    assert rc == 0
    records = load_samples(out)
    assert [r.id for r in records] == ["p1", "1"]
    assert records[0].prompt.startswith("SUBREDDIT: r/dogs\nTITLE: My dog ate a sock\nPOST:")
    assert records[0].prompt.endswith("\nTL;DR:")
    assert all(len(r.generations) == 3 and len(r.finish_reasons) == 3 for r in records)
    assert all(r.iteration == 1 for r in records)


def test_generate_says_when_no_control_tokens(tiny_model_dir, capsys):
    rc = main(
        [
            "generate",
            str(tiny_model_dir),
            "Hello there",
            "--max-new-tokens",
            "4",
            "--greedy",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert "has no control tokens" in captured.err
    line = json.loads(captured.out.strip().splitlines()[0])
    assert line["prompt"] == "Hello there" and line["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        (None, [], "no such file"),
        (["{not json"], [], "p.jsonl:1: malformed JSON"),
        ([json.dumps(GOOD_ROW), '{"title": "t"}'], [], "p.jsonl:2: needs a 'prompt' field"),
        ([json.dumps({"subreddit": "a", "post": "b"})], [], "field 'title' is missing"),
        ([json.dumps({"prompt": "  "})], [], "p.jsonl:1: field 'prompt' is empty"),
        ([], [], "no usable prompt rows"),
        ([json.dumps(GOOD_ROW)], ["-k", "0"], "--num-samples must be >= 1"),
        ([json.dumps(GOOD_ROW)], ["--shard", "3/2"], "--shard 3/2"),
    ],
)
def test_sample_bad_input_exits_2(tmp_path, tiny_model_dir, capsys, lines, extra, message):
    prompts = tmp_path / "p.jsonl"
    if lines is not None:
        write(prompts, lines)
    out = tmp_path / "s.jsonl"
    rc = main(
        [
            "sample",
            "--model",
            str(tiny_model_dir),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            *extra,
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one clear line, no traceback
    assert not out.exists() and not list(tmp_path.glob(".s.jsonl*"))


@pytest.mark.parametrize(
    ("model", "message"),
    [("embedded:nope", "unknown embedded model 'embedded:nope'"), ("EMPTY", "no model weights")],
)
def test_bad_model_exits_2(tmp_path, capsys, model, message):
    if model == "EMPTY":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        model = str(tmp_path / "empty")
    rc = main(["generate", model, "Hello"])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_generate_rejects_empty_prompt(tiny_model_dir, capsys):
    assert main(["generate", str(tiny_model_dir), " "]) == 2
    assert "prompt is empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("saved", "flag", "expected"),
    [
        ("suffix", [], "Hello there_QUANTILE_TOKEN_0_"),
        ("suffix", ["--placement", "prefix"], "_QUANTILE_TOKEN_0_Hello there"),
        (None, [], "_QUANTILE_TOKEN_0_Hello there"),  # tokens without conditioning.json: ALT's
        ("suffix", ["--no-condition"], "Hello there"),
    ],
)
def test_generate_conditions_as_the_checkpoint_was_trained(
    tiny_model_dir, monkeypatch, saved, flag, expected
):
    """The control goes where the checkpoint's conditioning.json says, unless overridden."""
    from alignment.conditioning import Conditioning
    from alignment.models import load_model_and_tokenizer
    from samplers import HFSampler

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    conditioning = Conditioning.quantile_tokens(5, saved or "prefix")
    conditioning.prepare(tokenizer, model, seed=0)
    model.save_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(tiny_model_dir)
    if saved:
        conditioning.save(tiny_model_dir)
    seen = []
    sample = HFSampler.sample

    def spy(self, prompts, *args, **kwargs):
        seen.extend(prompts)
        return sample(self, prompts, *args, **kwargs)

    monkeypatch.setattr(HFSampler, "sample", spy)
    argv = ["generate", str(tiny_model_dir), "Hello there", "--max-new-tokens", "3", *flag]
    assert main(argv) == 0
    assert seen == [expected]
