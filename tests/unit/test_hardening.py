"""Regression tests for the "Hardening" issue: each fails on the code before its fix.

Bad input must end as one line and exit status 2 (README, Usage), never as a traceback, a random
model or a silently wrong file. The tiny models come from tests/conftest.py; nothing is
downloaded, and the hub is never contacted (its reachability is patched where it matters).
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from conftest import build_tiny_model
from safetensors.torch import load_file, save_file

import alignment.models as models
import alignment.quantiles as quantiles
from alignment.config import SamplingConfig, TrainConfig, load_config
from alignment.errors import UserError
from alignment.io import read_jsonl, write_jsonl
from alignment.pool import TrainItem
from alignment.prompts import load_prompts
from alignment.records import load_samples
from alignment.trainer import ConditionalTrainer, encode_target
from experiments.cli import main
from rewards import load_reward


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line; progress bars (carriage-return lines on stderr) may precede it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("quark-alt: error: "), err
    return lines[0]


def length_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c)) for c in completions]


# ------------------------------------------------------------------ 1. score --resume, repeated ids


def test_resume_with_repeated_ids_keeps_every_line_in_place(tmp_path: Path) -> None:
    # `sample` copies ids from the prompt file, so two lines may share one; their generations can
    # also coincide (short greedy outputs). Only the first line was scored before the crash.
    lines = [
        {"id": "a", "prompt": "POST: first\nTL;DR:", "generations": ["x", "yy"]},
        {"id": "a", "prompt": "POST: second\nTL;DR:", "generations": ["x", "yy"]},
    ]
    source = write_lines(tmp_path / "in.jsonl", lines)
    output = write_lines(tmp_path / "out.jsonl", [{**lines[0], "rewards": [7.0, 8.0]}])
    rc = main(
        [
            "score",
            "--reward",
            f"{__name__}:length_reward",
            "--input",
            str(source),
            "--output",
            str(output),
            "--resume",
        ]
    )
    assert rc == 0
    out = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["prompt"] for r in out] == [lines[0]["prompt"], lines[1]["prompt"]]
    assert out[0]["rewards"] == [7.0, 8.0]  # kept, not rescored
    assert out[1]["rewards"] == [1.0, 2.0]  # scored now


def test_resume_refuses_a_line_whose_prompt_differs(tmp_path: Path, capsys) -> None:
    source = write_lines(
        tmp_path / "in.jsonl", [{"id": "a", "prompt": "POST: one\nTL;DR:", "generations": ["x"]}]
    )
    old = {"id": "a", "prompt": "POST: two\nTL;DR:", "generations": ["x"], "rewards": [1.0]}
    output = write_lines(tmp_path / "out.jsonl", [old])
    args = ["score", "--reward", f"{__name__}:length_reward", "--input", str(source)]
    assert main([*args, "--output", str(output), "--resume"]) == 2
    assert "out.jsonl:1: prompt differs from the input line" in one_line_error(capsys)


# ------------------------------------------------------------------ 3. weights that do not fit


def _saved(tmp_path: Path, family: str, tokenizer, name: str = "m") -> Path:
    folder = tmp_path / name
    build_tiny_model(family, len(tokenizer), tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_checkpoint_with_renamed_keys_is_refused(tmp_path, tiny_tokenizer, capsys) -> None:
    folder = _saved(tmp_path, "gptj", tiny_tokenizer)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    renamed = {k.replace("transformer.h.1.", "transformer.block.1."): v for k, v in state.items()}
    save_file(renamed, weights, metadata={"format": "pt"})
    assert main(["generate", str(folder), "Hello", "--max-new-tokens", "2"]) == 2
    err = one_line_error(capsys)
    assert "missing weight(s) (transformer.h.1." in err
    assert "unexpected weight(s) (transformer.block.1." in err


def test_tied_output_embedding_is_not_missing(tmp_path, tiny_tokenizer) -> None:
    folder = _saved(tmp_path, "gpt2", tiny_tokenizer)  # GPT-2 ties lm_head to wte
    state = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in state
    model = models.load_model(str(folder), device="cpu")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_classifier_head_is_fresh_only_when_asked(tmp_path, tiny_tokenizer) -> None:
    folder = _saved(tmp_path, "gpt2", tiny_tokenizer)
    # train-rm asks for a new head (num_labels): the missing `score` is expected there...
    models.load_model(str(folder), head="sequence-classification", num_labels=1, device="cpu")
    # ...but scoring with a causal LM as if it were a classifier would use a random head.
    with pytest.raises(UserError, match=r"missing weight\(s\) \(score.weight\)"):
        models.load_model(str(folder), head="sequence-classification", device="cpu")


# ------------------------------------------------------------------ 4. tracebacks -> one line


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"prompt": "ok", "generations": ["a"]}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"s\.jsonl:2: not UTF-8 \(byte 0xe9"):
        list(read_jsonl(path))


def test_score_over_invalid_utf8_exits_2(tmp_path: Path, capsys) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"prompt": "p\xff", "generations": ["a"]}\n')
    args = ["score", "--reward", f"{__name__}:length_reward", "--input", str(source)]
    assert main([*args, "--output", str(tmp_path / "out.jsonl")]) == 2
    assert "in.jsonl:1: not UTF-8" in one_line_error(capsys)


def test_truncated_safetensors_exits_2(tmp_path, tiny_tokenizer, capsys) -> None:
    folder = _saved(tmp_path, "gpt2", tiny_tokenizer)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["generate", str(folder), "Hello"]) == 2
    assert "cannot load model" in one_line_error(capsys)


class _RunsCode:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("this must never run",))


def test_pickle_refused_by_weights_only_loader_exits_2(tmp_path, tiny_tokenizer, capsys) -> None:
    folder = _saved(tmp_path, "gpt2", tiny_tokenizer)
    (folder / "model.safetensors").unlink()
    model = build_tiny_model("gpt2", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    torch.save({**model.state_dict(), "x": _RunsCode()}, folder / "pytorch_model.bin")
    assert main(["generate", str(folder), "Hello"]) == 2
    err = one_line_error(capsys)
    assert "cannot load model" in err and "Weights only load failed" in err
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--limit", "-2"], "--limit must be >= 1, got -2"),  # item 8: slicing kept one prompt
        (["--shard", "1/2"], "shard 1/2 of 1 prompt(s) is empty"),
        (["--temperature", "nan"], "sampling.temperature must be > 0"),
    ],
)
def test_sample_refuses_before_loading_the_model(tmp_path, capsys, extra, message) -> None:
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "Hello there"}])
    out = tmp_path / "s.jsonl"
    # The model does not exist: reaching the model load would give another message.
    args = ["sample", "--model", str(tmp_path / "absent-model"), "--prompts", str(prompts)]
    assert main([*args, "--out", str(out), *extra]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()


def test_resume_over_output_holding_nan_and_infinity(tmp_path: Path, capsys) -> None:
    lines = [
        {"prompt": "POST: a\nTL;DR:", "generations": ["x", "yy", "zzz"]},
        {"prompt": "POST: b\nTL;DR:", "generations": ["x"]},
    ]
    source = write_lines(tmp_path / "in.jsonl", lines)
    # Python's json (ALT's writer) emits NaN/Infinity; a kept line may hold them.
    output = write_lines(
        tmp_path / "out.jsonl",
        [
            '{"prompt": "POST: a\\nTL;DR:", "generations": ["x", "yy", "zzz"], '
            '"rewards": [NaN, Infinity, 1.0]}'
        ],
    )
    args = ["score", "--reward", f"{__name__}:length_reward", "--input", str(source)]
    assert main([*args, "--output", str(output), "--resume"]) == 0
    out = [json.loads(line) for line in output.read_text().splitlines()]
    assert out[0]["rewards"] == [None, None, 1.0]  # never ranked, stored as null
    assert out[1]["rewards"] == [1.0]
    assert "1 kept from before" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=-1", "train.learning_rate must be > 0"),
        ("train.learning_rate=0", "train.learning_rate must be > 0"),
        ("train.learning_rate=.nan", "'train.learning_rate' must be a finite number"),
        ("sampling.temperature=.nan", "'sampling.temperature' must be a finite number"),
        ("sampling.temperature=nan", "'sampling.temperature' must be a finite number"),
        ("train.kl_coef=.inf", "'train.kl_coef' must be a finite number"),
        ("train.adam_eps=0", "train.adam_eps must be > 0"),
        ("train.adam_betas=[0.9, 1.5]", r"train.adam_betas[1] must be in [0, 1)"),
        ("train.warmup_ratio=2", "train.warmup_ratio must be in [0, 1]"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0"),
        ("train.max_grad_norm=0", "train.max_grad_norm must be > 0"),
        ("pool.drop_factor=.nan", "'pool.drop_factor' must be a finite number"),
        ("train.learning_rate=[", "invalid YAML value"),
    ],
)
def test_config_numbers_are_checked_at_load(override: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_config_dataclasses_refuse_nan_directly() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=math.nan)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig(learning_rate=math.nan)
    TrainConfig()  # the defaults stay valid


def test_train_command_refuses_negative_learning_rate(tmp_path, capsys) -> None:
    out_dir = tmp_path / "run"
    rc = main(["train", "-", f"out_dir={out_dir}", "train.learning_rate=-1"])
    assert rc == 2
    assert "train.learning_rate must be > 0, got -1" in one_line_error(capsys)
    assert not out_dir.exists()


# ------------------------------------------------------------------ 6. typos fail at once


def _no_hub(monkeypatch) -> None:
    def unreachable(timeout: float = 3.0) -> bool:
        raise AssertionError("the hub must not be asked about this name")

    monkeypatch.setattr(models, "hub_reachable", unreachable)


def test_misspelt_reward_suggests_the_known_name(monkeypatch) -> None:
    _no_hub(monkeypatch)
    with pytest.raises(UserError, match="unknown reward 'embeded'; did you mean 'embedded'"):
        load_reward("embeded")


def test_misspelt_embedded_model_suggests_the_known_name() -> None:
    with pytest.raises(UserError, match="did you mean 'embedded:smollm2-135m-instruct'"):
        models.resolve_model_path("embedded:smollm2-135m-instruc")


def test_name_that_is_no_path_and_no_hub_id_fails_at_once(tmp_path, monkeypatch) -> None:
    _no_hub(monkeypatch)
    with pytest.raises(UserError, match="no such folder, and not a hub id"):
        models.resolve_model_path(str(tmp_path / "runs" / "demo" / "checkpoints" / "iter_003"))


@pytest.mark.parametrize("why", ["offline", "unreachable"])
def test_uncached_hub_id_fails_at_once_without_the_hub(tmp_path, monkeypatch, why) -> None:
    monkeypatch.setattr(models.huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    if why == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        _no_hub(monkeypatch)
        expected = "HF_HUB_OFFLINE is set"
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
        expected = "the hub cannot be reached"
    with pytest.raises(UserError, match=expected):
        models.resolve_model_path("some-org/not-in-the-cache")


def test_cached_hub_id_is_used_from_the_cache_offline(tmp_path, monkeypatch) -> None:
    repo = tmp_path / "models--some-org--cached"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(models.huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_hub(monkeypatch)
    assert Path(models.resolve_model_path("some-org/cached")) == snapshot


# ------------------------------------------------------------------ 7. the umask is respected


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.jsonl").stat().st_mode) == mode


def test_converted_model_cache_folder_follows_the_umask(
    tmp_path, tiny_tokenizer, monkeypatch
) -> None:
    # The GGUF reading itself is replaced by the tiny model: only the folder handling is tested.
    model = build_tiny_model("gpt2", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: model)
    old = os.umask(0o022)
    try:
        models._convert_gguf(tmp_path, "x.gguf", tmp_path / "cache" / "converted")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cache" / "converted").stat().st_mode) == 0o755


# ------------------------------------------------------------------ 8. silent surprises


def test_too_few_samples_per_prompt_warns_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(quantiles, "_warned_too_few", set())
    with caplog.at_level(logging.WARNING, logger="alignment.quantiles"):
        first = quantiles.assign_quantiles_scoped([[1.0, 2.0], [3.0] * 5], 5, "prompt")
        quantiles.assign_quantiles_scoped([[1.0, 2.0]], 5, "prompt")
    assert first[0] == [4, 4]  # ALT's rule, unchanged: everything in the worst bucket
    messages = [r.getMessage() for r in caplog.records if r.name == "alignment.quantiles"]
    assert len(messages) == 1
    assert "1 prompt(s) have fewer usable rewards (as few as 2) than the 5 quantiles" in messages[0]


def test_enough_samples_per_prompt_does_not_warn(monkeypatch, caplog) -> None:
    monkeypatch.setattr(quantiles, "_warned_too_few", set())
    with caplog.at_level(logging.WARNING, logger="alignment.quantiles"):
        quantiles.assign_quantiles_scoped([[1.0, 2.0, None, math.nan], []], 2, "prompt")
        quantiles.assign_quantiles_scoped([[1.0], [2.0]], 2, "global")
    assert not [r for r in caplog.records if r.name == "alignment.quantiles"]


def test_bitsandbytes_missing_kernels_notice_is_dropped(caplog) -> None:
    import alignment  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure "
            "you already `pip install kernels` and the kernels >= 0.11.1",
            ModuleNotFoundError("No module named 'kernels'"),
        )
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "p", "generations": ["a"]}\n{"prompt": "p", "gener', "s.jsonl:2: malformed"),
        (b'{"prompt": "p", "generations": ["a"]}\n\xff\xfe\n', "s.jsonl:2: not UTF-8"),
        (b'{"prompt": "p", "generations": ["a"], "rewards": [1' + b"0" * 5000 + b"]}\n", ":1:"),
        (b'{"prompt": "p", "generations": ["a"]}\n' + b"[" * 100_000 + b"\n", "s.jsonl:2:"),
        (b'{"prompt": "\\ud800", "generations": ["a"]}\n', "s.jsonl:1: a string holds a lone"),
    ],
)
def test_corrupt_stage_file_names_file_and_line(tmp_path: Path, content, message) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_samples(path)


def test_prompt_limit_below_one_is_refused(tmp_path: Path) -> None:
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(UserError, match="limit must be >= 1"):
        load_prompts(prompts, limit=-1)


# ------------------------------------------------------------------ 9. code execution is stated


def test_score_help_says_function_rewards_run_code(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    assert "arbitrary code" in " ".join(capsys.readouterr().out.split())


# ------------------------------------------------------------------ EOS on training targets


def test_encode_target_appends_eos_only_when_asked(tiny_tokenizer) -> None:
    eos = tiny_tokenizer.eos_token_id
    with_eos = encode_target(tiny_tokenizer, "my dog ate a sock", True, max_tokens=3)
    without = encode_target(tiny_tokenizer, "my dog ate a sock", False, max_tokens=3)
    assert with_eos == [*without, eos] and len(without) == 3 and eos not in without


@pytest.mark.parametrize(
    ("finish_reason", "ends_with_eos"), [("stop", True), (None, True), ("length", False)]
)
def test_trainer_targets_end_with_eos_unless_cut_at_the_length_limit(
    tiny_tokenizer, finish_reason, ends_with_eos
) -> None:
    # A generation cut at max_new_tokens did not end: teaching EOS there would train the model
    # to stop mid-sentence. The rule lives in the trainer's encoding of a TrainItem.
    model = build_tiny_model("gpt2", len(tiny_tokenizer), tiny_tokenizer.eos_token_id)
    trainer = ConditionalTrainer(
        model,
        tiny_tokenizer,
        TrainConfig(),
        SamplingConfig(max_new_tokens=4),
        None,
        Accelerator(cpu=True),
    )
    item = TrainItem("POST: a\nTL;DR:", "my dog ate a sock", 0, finish_reason, 1.0)
    *_, target = trainer._encode(item)
    expected = encode_target(tiny_tokenizer, item.generation, ends_with_eos, max_tokens=4)
    assert target == expected
    assert (target[-1] == tiny_tokenizer.eos_token_id) is ends_with_eos
