"""Tests for `quark-alt score` (rewards/cli.py), run through the real console entry point.

Rewards here are plain functions of this module (`test_score_cli:words`), so the tests exercise
the file handling, sharding, resume and quantiles, not a model; one test runs the embedded reward.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from alignment.errors import UserError
from alignment.models import resolve_model_path
from experiments.cli import main

CALLS: list[int] = []  # how many completions each call of `words` scored


def words(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """Reward = number of words; records the call size so resume tests can count work."""
    CALLS.append(len(completions))
    return [float(len(c.split())) for c in completions]


def sees_control_token(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    return [1.0 if "_QUANTILE_TOKEN_" in p else 0.0 for p in prompts]


def nan_for_x(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float | None]:
    table = {"x": math.nan, "inf": math.inf, "none": None}
    return [table.get(c, 1.0) for c in completions]


def fails_on_second_call(prompts: list[str], completions: list[str], **kw: Any) -> list[float]:
    CALLS.append(len(completions))
    if len(CALLS) == 2:
        raise KeyboardInterrupt if kw.get("interrupt") else RuntimeError("scorer crashed")
    return [0.5] * len(completions)


def one_short(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    return [0.0] * (len(completions) - 1)


ALT_LINES = [  # ALT's own format: prompt and generations only
    {"prompt": "POST: a\nTL;DR:", "generations": ["one", "one two three", "one two"]},
    {"prompt": "POST: b\nTL;DR:", "generations": ["a b c d e", "a"]},
    {"prompt": "POST: c\nTL;DR:", "generations": ["x y", "x y z w", "x", "x y z"]},
    {"prompt": "POST: a\nTL;DR:", "generations": ["p q", "p"]},  # a repeated prompt
]


def write(path: Path, lines: list[Any]) -> Path:
    """One line per item: strings as they are (to write broken JSON), the rest as JSON."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def score(tmp_path: Path, reward: str, *extra: str, lines: list[Any] | None = None) -> int:
    source = tmp_path / "in.jsonl"
    if not source.exists():
        write(source, ALT_LINES if lines is None else lines)
    args = ["score", "--reward", reward, "--input", str(source), "--output"]
    return main([*args, str(tmp_path / "out.jsonl"), *extra])


def test_alt_format_file_gets_rewards_and_per_prompt_quantiles(tmp_path: Path, capsys) -> None:
    assert score(tmp_path, f"{__name__}:words", "--num-quantiles", "2") == 0
    out = read(tmp_path / "out.jsonl")
    assert [r["prompt"] for r in out] == [r["prompt"] for r in ALT_LINES]
    assert out[0]["rewards"] == [1.0, 3.0, 2.0]
    # Per prompt, K=2: b = 1; best -> 0, then 1, remainder to the worst bucket.
    assert out[0]["quantiles"] == [1, 0, 1]
    assert out[2]["quantiles"] == [1, 0, 1, 0]
    assert set(out[0]) == {"prompt", "generations", "rewards", "quantiles"}
    printed = capsys.readouterr().out
    assert "4 lines" in printed and "11 generations" in printed
    assert "reward mean 2.2727 std 1.2856" in printed and "non-finite 0, missing 0" in printed


def test_global_scope_ranks_over_the_whole_file(tmp_path: Path) -> None:
    rc = score(tmp_path, f"{__name__}:words", "--num-quantiles", "2", "--scope", "global")
    assert rc == 0
    out = read(tmp_path / "out.jsonl")
    # 11 rewards [1,3,2 | 5,1 | 2,4,1,3 | 2,1], b = 5: the five best are 5, 4, 3, 3 and the
    # first 2 (line 0), so line 0 gets [1, 0, 0] (per prompt it was [1, 0, 1]).
    assert out[0]["quantiles"] == [1, 0, 0] and out[2]["quantiles"] == [1, 0, 1, 0]


def test_conditioning_is_stripped_before_scoring(tmp_path: Path) -> None:
    lines = [{"prompt": "_QUANTILE_TOKEN_0_POST: a\nTL;DR:", "generations": ["x", "y"]}]
    assert score(tmp_path, f"{__name__}:sees_control_token", lines=lines) == 0
    (row,) = read(tmp_path / "out.jsonl")
    assert row["rewards"] == [0.0, 0.0] and row["prompt"] == lines[0]["prompt"]


def test_shard_takes_every_nth_line(tmp_path: Path) -> None:
    assert score(tmp_path, f"{__name__}:words", "--shard", "1/2") == 0
    out = read(tmp_path / "out.jsonl")
    assert [r["generations"] for r in out] == [
        ALT_LINES[1]["generations"],
        ALT_LINES[3]["generations"],
    ]


def test_resume_keeps_finished_lines_and_scores_the_rest(tmp_path: Path, capsys) -> None:
    assert score(tmp_path, f"{__name__}:words") == 0
    out_path = tmp_path / "out.jsonl"
    done = read(out_path)[:2]
    done[0]["rewards"] = [9.0, 9.0, 9.0]  # a marker: kept lines are not rescored
    write(out_path, done)
    CALLS.clear()
    assert score(tmp_path, f"{__name__}:words", "--resume") == 0
    assert sum(CALLS) == 4 + 2  # only lines 3 and 4
    out = read(out_path)
    assert out[0]["rewards"] == [9.0, 9.0, 9.0] and out[3]["rewards"] == [2.0, 1.0]
    assert "2 kept from before" in capsys.readouterr().out


@pytest.mark.parametrize("interrupt", [False, True])
def test_partial_output_after_a_crash_is_completed_by_resume(tmp_path: Path, interrupt) -> None:
    # Two chunks of ~256 generations: lines 0-1, then line 2; saved after every chunk.
    lines = [{"prompt": f"p{i}", "generations": [f"g{j}" for j in range(200)]} for i in range(3)]
    CALLS.clear()
    reward = f"{__name__}:fails_on_second_call"
    extra = ["--save-every", "0", "--reward-arg", f"interrupt={json.dumps(interrupt)}"]
    if interrupt:
        assert score(tmp_path, reward, *extra, lines=lines) == 130
    else:
        with pytest.raises(RuntimeError, match="scorer crashed"):
            score(tmp_path, reward, *extra, lines=lines)
    assert [r["prompt"] for r in read(tmp_path / "out.jsonl")] == ["p0", "p1"]
    CALLS.clear()
    assert score(tmp_path, f"{__name__}:words", "--resume") == 0
    assert CALLS == [200]
    out = read(tmp_path / "out.jsonl")
    assert [r["rewards"][0] for r in out] == [0.5, 0.5, 1.0]


def test_non_finite_rewards_are_stored_missing_and_never_ranked(tmp_path: Path, capsys) -> None:
    lines = [{"prompt": "p", "generations": ["x", "a", "inf", "b", "none"]}]
    assert score(tmp_path, f"{__name__}:nan_for_x", "--num-quantiles", "2", lines=lines) == 0
    (row,) = read(tmp_path / "out.jsonl")
    assert row["rewards"] == [None, 1.0, None, 1.0, None]
    assert row["quantiles"] == [None, 0, None, 1, None]
    assert "non-finite 2, missing 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("lines", "reward", "extra", "message"),
    [
        (None, "words", [], "in.jsonl: no such file"),
        (
            ['{"prompt": "p", "generations": ["a"]}', "{oops"],
            "words",
            [],
            "in.jsonl:2: malformed JSON",
        ),
        (
            [{"prompt": "p", "generations": ["a", "b"], "rewards": [1.0]}],
            "words",
            [],
            "in.jsonl:1: field 'rewards' has 1 entries but 'generations' has 2",
        ),
        ([{"prompt": "p", "generations": []}], "words", [], "in.jsonl:1: field 'generations' is"),
        ([{"prompt": "p"}], "words", [], "in.jsonl:1: field 'generations' must be a list"),
        ([], "words", [], "in.jsonl: no sample lines"),
        (ALT_LINES, "one_short", [], "returned 10 rewards for 11 generations"),
        (ALT_LINES, "words", ["--shard", "2/2"], "--shard 2/2"),
        (ALT_LINES, "words", ["--num-quantiles", "0"], "--num-quantiles must be >= 1"),
        (ALT_LINES, "words", ["--reward-arg", "novalue"], "must look like KEY=VALUE"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, lines, reward, extra, message):
    if lines is not None:
        write(tmp_path / "in.jsonl", lines)
    else:
        (tmp_path / "in.jsonl").unlink(missing_ok=True)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rc = main(
        [
            "score",
            "--reward",
            f"{__name__}:{reward}",
            "--input",
            str(source),
            "--output",
            str(output),
            *extra,
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one clear line, no traceback
    assert not output.exists() and not list(tmp_path.glob(".out.jsonl*"))


def test_resume_refuses_an_output_that_does_not_match(tmp_path: Path, capsys) -> None:
    write(
        tmp_path / "out.jsonl",
        [{"prompt": "POST: a\nTL;DR:", "generations": ["other"], "rewards": [1.0]}],
    )
    assert score(tmp_path, f"{__name__}:words", "--resume") == 2
    assert "out.jsonl:1: generations differ from the input line" in capsys.readouterr().err


def test_embedded_reward_end_to_end(tmp_path: Path) -> None:
    lines = [
        {
            "prompt": "SUBREDDIT: r/dogs\nTITLE: Dog\nPOST: My dog will not eat when I am in the "
            "room, only after I leave.\nTL;DR:",
            "generations": [" my dog only eats when I leave the room", "", " dog dog dog dog dog"],
        },
    ]
    try:
        resolve_model_path("embedded:minilm-l6")
    except UserError as err:  # the wheel is not installed
        pytest.skip(str(err))
    assert score(tmp_path, "embedded", "--num-quantiles", "3", "--device", "cpu", lines=lines) == 0
    (row,) = read(tmp_path / "out.jsonl")
    assert row["quantiles"] == [0, 2, 1] and row["rewards"][1] == -1.0
