"""`quark-alt eval` end to end on the tiny GPT-J checkpoint with a word-count reward."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from alignment.comparison import paired_difference
from alignment.conditioning import Conditioning
from alignment.models import load_model_and_tokenizer
from experiments.cli import main
from experiments.commands.eval import resolve_policy

REWARD_MODULE = "quark_eval_test_reward"
FAST = ["--max-new-tokens", "6", "--device", "cpu", "--seed", "3"]

PROMPTS = [
    {"id": "a", "prompt": "POST: my dog ate a sock\nTL;DR:", "label": "dog ate sock"},
    {"id": "b", "prompt": "POST: the rent went up again\nTL;DR:", "label": "rent up"},
    {"id": "c", "prompt": "POST: I lost my keys at work\nTL;DR:", "label": "lost keys today"},
]


@pytest.fixture
def reward(tmp_path, monkeypatch) -> str:
    """A `module:function` reward on sys.path: the number of words of the completion."""
    folder = tmp_path / "reward_module"
    folder.mkdir()
    (folder / f"{REWARD_MODULE}.py").write_text(
        "def words(prompts, completions, **kwargs):\n"
        "    return [float(len(c.split())) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    return f"{REWARD_MODULE}:words"


def write_prompts(path: Path, with_references: bool = True) -> Path:
    rows = PROMPTS if with_references else [{k: r[k] for k in ("id", "prompt")} for r in PROMPTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prompts(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl")


@pytest.fixture
def conditioned_dir(tmp_path, tiny_model_dir) -> Path:
    """The tiny checkpoint with 3 quantile tokens added and a conditioning.json."""
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    conditioning = Conditioning.quantile_tokens(3)
    conditioning.prepare(tokenizer, model, seed=0)
    folder = tmp_path / "conditioned"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    conditioning.save(folder)
    return folder


def run_eval(*argv: str) -> int:
    return main(["eval", *argv, *FAST])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_same_policy_twice_is_an_exact_tie(tmp_path, tiny_model_dir, prompts, reward, capsys):
    out = tmp_path / "eval.json"
    d = str(tiny_model_dir)
    argv = [d, d, "--prompts", str(prompts), "--reward", reward, "-k", "2", "--out", str(out)]
    assert run_eval(*argv) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert len([line for line in stdout if line.startswith(d + ":")]) == 2
    assert "vs baseline +0.0000" in stdout[1] and "W/T/L 0/3/0" in stdout[1]
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert settings["samples_per_prompt"] == 2 and settings["num_prompts"] == 3
    assert settings["reward"] == reward and settings["reference"] == d
    assert settings["sampling"]["max_new_tokens"] == 6 and settings["vs_references"] is True
    first, second = report["policies"]
    assert first["paired_vs_baseline"] is None
    assert first["conditioning"] is None and first["path"] == d
    m = first["metrics"]
    assert (m["num_prompts"], m["num_samples"]) == (3, 6)
    means = m["per_prompt_reward"]
    assert len(means) == 3
    # prompt-level mean and SE (ddof=1) of the per-prompt means, by hand
    mean = sum(means) / 3
    assert m["reward_mean"] == pytest.approx(mean)
    if len(set(means)) > 1:
        sd = math.sqrt(sum((x - mean) ** 2 for x in means) / 2)
        assert m["reward_stderr"] == pytest.approx(sd / math.sqrt(3))
    for key in ("length", "stopped_fraction", "distinct_1", "distinct_2", "ref_perplexity"):
        assert key in m
    assert abs(m["kl"]) < 1e-5  # the policy is its own reference
    assert m["win_rate_vs_references"]["n"] == 3
    assert 0.0 <= m["win_rate_vs_references"]["mean"] <= 1.0
    # same prompts, seed and settings: identical generations, so an exact tie on every prompt
    assert second["metrics"]["per_prompt_reward"] == means
    assert second["paired_vs_baseline"] == {
        "baseline": d,
        "mean": 0.0,
        "stderr": 0.0,
        "n": 3,
        "wins": 0,
        "ties": 3,
        "losses": 0,
    }


def test_conditioning_curve_on_a_conditioned_checkpoint(
    tmp_path, tiny_model_dir, conditioned_dir, prompts, reward, capsys
):
    out = tmp_path / "eval.json"
    argv = [str(tiny_model_dir), str(conditioned_dir), "--prompts", str(prompts)]
    argv += ["--reward", reward, "-k", "2", "--out", str(out), "--conditioning-curve"]
    argv += ["--reference", "none", "--no-vs-references"]
    assert run_eval(*argv) == 0
    stdout = capsys.readouterr().out
    assert "best-worst control" in stdout
    baseline, policy = json.loads(out.read_text())["policies"]
    assert baseline["conditioning"] is None and baseline["conditioning_curve"] is None
    assert "ref_perplexity" not in policy["metrics"]
    assert "win_rate_vs_references" not in policy["metrics"]
    assert policy["conditioning"] == {
        "kind": "tokens",
        "controls": ["_QUANTILE_TOKEN_0_", "_QUANTILE_TOKEN_1_", "_QUANTILE_TOKEN_2_"],
        "placement": "prefix",
        "template": None,
    }
    assert policy["control"] == "_QUANTILE_TOKEN_0_"
    curve = policy["conditioning_curve"]
    assert [c["quantile"] for c in curve["controls"]] == [0, 1, 2]
    best = curve["controls"][0]["per_prompt_reward"]
    worst = curve["controls"][2]["per_prompt_reward"]
    assert best == policy["metrics"]["per_prompt_reward"]
    expected = paired_difference(worst, best)
    got = curve["best_minus_worst"]
    assert got["n"] == 3
    assert got["mean"] == pytest.approx(sum(b - w for b, w in zip(best, worst, strict=True)) / 3)
    assert got["mean"] == pytest.approx(expected.mean)
    assert (got["wins"], got["ties"], got["losses"]) == (
        expected.wins,
        expected.ties,
        expected.losses,
    )


def test_no_condition_evaluates_unconditioned(tmp_path, conditioned_dir, prompts, reward):
    out = tmp_path / "eval.json"
    argv = [str(conditioned_dir), "--prompts", str(prompts), "--reward", reward, "-k", "1"]
    assert run_eval(*argv, "--out", str(out), "--no-condition", "--reference", "none") == 0
    (policy,) = json.loads(out.read_text())["policies"]
    assert policy["conditioning"] is None and policy["control"] is None


def test_run_directory_means_its_newest_checkpoint(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    for name in ("iter_001", "iter_002"):
        shutil.copytree(tiny_model_dir, run / "checkpoints" / name)
    (run / "config.yaml").write_text("iterations: 2\n")
    assert resolve_policy(str(run)) == str(run / "checkpoints" / "iter_002")
    checkpoint = str(run / "checkpoints" / "iter_001")
    assert resolve_policy(checkpoint) == checkpoint
    assert resolve_policy(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_policy("embedded:smollm2-135m-instruct") == "embedded:smollm2-135m-instruct"


def test_bad_inputs_exit_2_with_one_line(
    tmp_path, tiny_model_dir, conditioned_dir, prompts, reward, capsys
):
    d, common = str(tiny_model_dir), ["--reward", reward, "--out", str(tmp_path / "e.json")]

    assert run_eval(d, "--prompts", str(prompts), "--conditioning-curve", *common) == 2
    assert "not conditioned" in one_line_error(capsys)

    bare = write_prompts(tmp_path / "bare.jsonl", with_references=False)
    assert run_eval(d, "--prompts", str(bare), "--vs-references", *common) == 2
    err = one_line_error(capsys)
    assert str(bare) in err and "reference" in err

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("iterations: 1\n")
    assert run_eval(d, str(run), "--prompts", str(prompts), *common) == 2
    assert "without checkpoints" in one_line_error(capsys)

    # conditioning.json says tokens, the tokenizer has none
    lacking = tmp_path / "lacking"
    shutil.copytree(tiny_model_dir, lacking)
    shutil.copy(conditioned_dir / "conditioning.json", lacking)
    assert run_eval(str(lacking), "--prompts", str(prompts), *common) == 2
    err = one_line_error(capsys)
    assert str(lacking) in err and "_QUANTILE_TOKEN_0_" in err

    assert run_eval(d, "--prompts", str(prompts), "-k", "0", *common) == 2
    assert "--num-samples" in one_line_error(capsys)
    assert not (tmp_path / "e.json").exists()


def test_best_of_n_from_the_eval_samples_and_from_its_own_pool(
    tmp_path, tiny_model_dir, prompts, reward, capsys
):
    out = tmp_path / "eval.json"
    common = ["--prompts", str(prompts), "--reward", reward, "--reference", "none"]
    d = str(tiny_model_dir)
    # -k 4 = max(N): the eval's own samples are the pool, so N = 1 is the eval's reward
    assert run_eval(d, *common, "-k", "4", "--best-of-n", "4", "1", "2", "--out", str(out)) == 0
    assert "reward (best of N)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["settings"]["best_of_n"] == [4, 1, 2]
    (policy,) = report["policies"]
    rows = policy["best_of_n"]
    assert [r["n"] for r in rows] == [1, 2, 4] and [r["samples"] for r in rows] == [3, 6, 12]
    assert rows[0]["per_prompt_reward"] == pytest.approx(policy["metrics"]["per_prompt_reward"])
    assert rows[0]["kl_estimate"] == pytest.approx(0.0, abs=1e-12)
    means = [r["reward_mean"] for r in rows]
    assert means[0] <= means[1] + 1e-12 <= means[2] + 2e-12
    # a pool of its own (3 per prompt) when -k differs
    assert run_eval(d, *common, "-k", "1", "--best-of-n", "3", "--out", str(out)) == 0
    (row,) = json.loads(out.read_text())["policies"][0]["best_of_n"]
    assert (row["n"], row["samples"], row["reward_prompts"]) == (3, 9, 3)
    capsys.readouterr()
    assert run_eval(d, *common, "--best-of-n", "0", "2", "--out", str(out)) == 2
    assert "--best-of-n: best_of_n.n must be distinct integers >= 1" in one_line_error(capsys)


def test_a_killed_eval_resumes_from_its_finished_policies(
    tmp_path, tiny_model_dir, conditioned_dir, prompts, reward, monkeypatch
):
    import experiments.commands.eval as eval_command

    out = tmp_path / "eval.json"
    argv = [str(tiny_model_dir), str(conditioned_dir), "--prompts", str(prompts)]
    argv += ["--reward", reward, "-k", "2", "--out", str(out)]
    evaluated: list[str] = []
    real = eval_command._evaluate_policy
    kills = [1]

    def evaluate_then_die(name, *args, **kwargs):
        evaluated.append(name)
        if name == str(conditioned_dir) and kills:
            kills.pop()
            raise RuntimeError("killed")  # while evaluating the second policy
        return real(name, *args, **kwargs)

    monkeypatch.setattr(eval_command, "_evaluate_policy", evaluate_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        run_eval(*argv)
    assert not out.exists() and len(list(Path(f"{out}.parts").iterdir())) == 1
    assert run_eval(*argv) == 0
    assert evaluated == [str(tiny_model_dir), str(conditioned_dir), str(conditioned_dir)]
    report = json.loads(out.read_text())
    assert [p["path"] for p in report["policies"]] == [str(tiny_model_dir), str(conditioned_dir)]
    assert report["policies"][1]["paired_vs_baseline"]["n"] == 3
    # a finished eval keeps its parts: evaluating one more policy recomputes only that one
    another = tmp_path / "another"
    shutil.copytree(tiny_model_dir, another)
    evaluated.clear()
    assert run_eval(*argv[:2], str(another), *argv[2:]) == 0
    assert evaluated == [str(another)]
    assert len(json.loads(out.read_text())["policies"]) == 3
    # other settings are another evaluation: nothing is reused from it
    evaluated.clear()
    assert run_eval(*argv, "-k", "1") == 0
    assert evaluated == [str(tiny_model_dir), str(conditioned_dir)]


def test_llm_judge_in_both_orders_against_references_and_the_baseline(
    tmp_path, tiny_model_dir, prompts, reward, server, monkeypatch
):
    monkeypatch.setenv("JUDGE_KEY", "secret")

    def prefer_the_longer(body: dict) -> str:
        text = body["messages"][-1]["content"]
        first = text.split("Summary 1:\n")[1].split("\n\nSummary 2:")[0]
        second = text.split("Summary 2:\n")[1].split("\n\n")[0]
        return f"Comparison: length.\nPreferred: {1 if len(first) >= len(second) else 2}"

    server.reply = prefer_the_longer
    out = tmp_path / "eval.json"
    d = str(tiny_model_dir)
    judge = ["--judge-url", f"http://127.0.0.1:{server.server_port}/v1", "--judge-model", "j"]
    judge += ["--judge-key-env", "JUDGE_KEY"]
    argv = [d, d, "--prompts", str(prompts), "--reward", reward, "-k", "2", "--out", str(out)]
    assert run_eval(*argv, *judge) == 0
    first, second = json.loads(out.read_text())["policies"]
    samples = 3 * 2
    # each sample against its human summary, both orders: 2 requests per sample
    vs_refs = first["judge"]["vs_references"]
    assert vs_refs["wins"] + vs_refs["ties"] + vs_refs["losses"] == samples
    assert vs_refs["unusable"] == 0 and 0.0 <= vs_refs["mean"] <= 1.0
    assert "vs_baseline" not in first["judge"]
    # the same policy (identical samples) against itself: the judge prefers summary 1 in both
    # orders, which is a disagreement about A, so every pair is a tie
    assert second["judge"]["vs_baseline"] == {
        "mean": 0.5, "stderr": 0.0, "n": 3, "wins": 0, "ties": samples, "losses": 0, "unusable": 0
    }  # fmt: skip
    sent = len(server.requests)
    # at most: both orders of each sample against its reference (the second policy's identical
    # texts come from the cache) and against the baseline; identical conversations go once
    assert 0 < sent <= 2 * samples * 2
    assert run_eval(*argv, *judge) == 0 and len(server.requests) == sent  # all from the cache
    assert run_eval(*argv, "--judge-url", "http://127.0.0.1:1/v1") == 2  # model missing
