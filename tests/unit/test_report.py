"""`quark-alt report` on hand-written run directories in the loop's file formats."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from alignment.comparison import conditioning_curve
from alignment.evaluation import heldout_fingerprint
from alignment.prompts import PromptRow
from alignment.records import SampleRecord, save_samples
from experiments.cli import main
from experiments.commands.report import examples_section, load_run, load_runs, pairwise_table

HELDOUT = [
    PromptRow("a", "POST: my <b>dog</b> ate a sock\nTL;DR:"),
    PromptRow("b", "POST: rent\nTL;DR:"),
]
CURVE = conditioning_curve(
    ["_QUANTILE_TOKEN_0_", "_QUANTILE_TOKEN_1_"], [[3.0, 1.0], [0.0, 1.0]], 1
)


def write_run(
    folder: Path, algorithm: str, iterations: int = 2, heldout: list[PromptRow] = HELDOUT
) -> Path:
    """A finished run: 3 prompts x 2 generations sampled per iteration, an eval per iteration."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"algorithm": algorithm, "iterations": 2}))
    for i in range(iterations + 1):
        it_dir = folder / f"iter_{i:03d}"
        it_dir.mkdir()
        if i > 0:
            records = [SampleRecord(prompt=f"p{j}", generations=["x", "y"]) for j in range(3)]
            save_samples(it_dir / "samples.jsonl", records)
        row = {
            "iteration": i,
            "reward_mean": 0.1 * i,
            "reward_stderr": 0.05,
            "kl": 0.2 * i,
            "ref_perplexity": 3.0 + i,
            "length": 10.0 + i,
            "heldout": heldout_fingerprint(heldout),
        }
        if algorithm == "quark" and i > 0:
            row["conditioning_curve"] = CURVE
        (it_dir / "eval.json").write_text(json.dumps(row))
        (it_dir / "timing.json").write_text(json.dumps({"eval": 1.5, "sample": 0.5}))
    save_samples(
        it_dir / "eval_samples.jsonl",
        [
            SampleRecord(
                prompt=r.prompt, id=r.id, generations=[f"{algorithm} on {r.id}"], rewards=[0.5]
            )
            for r in heldout
        ],
    )
    return folder


def report(tmp_path: Path, *argv: str) -> tuple[int, str]:
    out = tmp_path / "report.html"
    rc = main(["report", *argv, "-o", str(out)])
    return rc, out.read_text() if rc == 0 else ""


def test_run_is_read_from_its_files(tmp_path):
    run = load_run(write_run(tmp_path / "q", "quark"))
    assert run.algorithm == "quark"
    assert [e["iteration"] for e in run.evals] == [0, 1, 2]
    assert run.samples_seen == [0, 6, 12]  # every generation sampled, cumulative
    assert run.seconds == pytest.approx(3 * 2.0)
    assert [r.id for r in run.examples] == ["a", "b"]


def test_report_has_sections_rows_images_and_no_urls(tmp_path):
    quark = write_run(tmp_path / "quark_run", "quark")
    rft = write_run(tmp_path / "rft_run", "rft", iterations=1)
    rc, page = report(tmp_path, str(quark), str(rft))
    assert rc == 0
    for section in (
        "evaluation",
        "reward",
        "frontier",
        "length",
        "ref_perplexity",
        "conditioning",
        "examples",
    ):
        assert f'<section id="{section}">' in page, section
    assert 'id="paired"' not in page
    table = page.split('<section id="evaluation">')[1].split("</section>")[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table)[1:]
    assert len(rows) == 2
    assert str(quark) in rows[0] and "quark" in rows[0] and ">12<" in rows[0]
    assert str(rft) in rows[1] and ">6<" in rows[1] and ">4<" in rows[1]  # samples, wall s
    assert "0.200 ± 0.050" in rows[0] and "1.500 ± 1.500" in rows[0]  # final reward; best - worst
    # the curve: one plot and table for quark, a note for rft, and the trend across runs
    assert "unconditioned" in page.split('id="conditioning"')[1]
    assert page.count("data:image/png;base64,") == 6  # 4 metric plots, 1 curve, 1 trend
    # example generations side by side, escaped
    assert "quark on a" in page and "rft on a" in page and "&lt;b&gt;dog&lt;/b&gt;" in page
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page


def test_eval_files_add_paired_and_best_of_n_tables_in_html_and_markdown(tmp_path, capsys):
    run = write_run(tmp_path / "run", "quark")
    paired = {"baseline": "init", "mean": 0.25, "stderr": 0.1, "n": 2, "wins": 1, "ties": 1}
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(
        json.dumps(
            {
                "settings": {"prompts": "held.jsonl", "samples_per_prompt": 4},
                "policies": [
                    {"name": "init", "metrics": {"reward_mean": 1.0}, "paired_vs_baseline": None},
                    {
                        "name": str(run),  # named by its run directory: the run's columns join
                        "metrics": {"reward_mean": 1.25, "reward_stderr": 0.2, "kl": 0.5},
                        "paired_vs_baseline": {**paired, "losses": 0},
                        "conditioning_curve": CURVE,
                    },
                ],
            }
        )
    )
    best = {"n": 4, "samples": 8, "reward_mean": 0.5, "reward_stderr": 0.1, "kl_bound": 0.636}
    best_json = tmp_path / "best.json"
    best_json.write_text(
        json.dumps(
            {
                "settings": {"prompts": "held.jsonl", "samples_per_prompt": 4},
                "policies": [{"name": "init", "metrics": {}, "best_of_n": [best]}],
            }
        )
    )
    md = tmp_path / "results.md"
    argv = [str(run), "--eval", str(eval_json), "--eval", str(best_json), "--markdown", str(md)]
    rc, page = report(tmp_path, *argv)
    assert rc == 0
    section = page.split('<section id="paired">')[1].split("</section>")[0]
    assert section.count("<h3>Paired comparison</h3>") == 2 and "<h3>Best of N</h3>" in section
    trained = re.findall(r"<tr>(.*?)</tr>", section)[2]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", trained)
    # policy, algorithm, samples, reward, gain, W/T/L, win rate (a tie is 1/2), vs refs, KL, ...
    assert cells[:9] == [str(run), "quark", "12", "1.250 ± 0.200", "0.250 ± 0.100", "1/1/0"] + [
        "0.750",
        "–",
        "0.500",
    ]
    assert cells[11:] == [
        "–",
        "1.500 ± 1.500",
        "6",
    ]  # empty share (not given), best - worst, wall s
    lines = md.read_text().splitlines()
    assert lines[0] == f"`{eval_json}`: prompts held.jsonl, samples_per_prompt 4"
    assert "| policy | algorithm | samples used | reward ± SE |" in lines[4]
    assert lines[5].startswith("| --- | --- | ---: |")
    assert "| init | – | – | 1.000 ± – | baseline |" in lines[6]
    assert lines[7].startswith(f"| {run} | quark | 12 | 1.250 ± 0.200 | 0.250 ± 0.100 | 1/1/0 |")
    assert "| init | 4 | 8 | 0.500 ± 0.100 | – ± – | 0.636 |" in lines
    capsys.readouterr()
    assert main(["report", str(run), "--markdown", str(md), "-o", str(tmp_path / "x")]) == 2
    assert "--markdown writes the --eval tables" in capsys.readouterr().err


def test_mixed_heldout_sets_are_refused_naming_the_runs(tmp_path, capsys):
    same = write_run(tmp_path / "same", "quark")
    other = write_run(tmp_path / "other", "rft", heldout=HELDOUT[:1])
    also_same = write_run(tmp_path / "also_same", "alt-rm")
    assert report(tmp_path, str(same), str(other), str(also_same))[0] == 2
    err = capsys.readouterr().err
    assert "different eval prompts" in err
    assert f"{same}, {also_same} (2 prompts" in err and f"{other} (1 prompts" in err
    with pytest.raises(Exception, match="different eval prompts"):
        load_runs([same, other])


def test_a_folder_without_evaluations_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text("algorithm: quark\n")
    assert report(tmp_path, str(empty))[0] == 2
    assert f"{empty}: no iter_*/eval.json" in capsys.readouterr().err
    assert report(tmp_path, str(tmp_path / "missing"))[0] == 2
    assert "no such run directory" in capsys.readouterr().err
    bad_eval = tmp_path / "bad.json"
    bad_eval.write_text("{}")
    run = write_run(tmp_path / "run", "rft")
    assert report(tmp_path, str(run), "--eval", str(bad_eval))[0] == 2
    assert "not a `quark-alt eval` report" in capsys.readouterr().err


def test_examples_note_runs_without_saved_generations(tmp_path):
    saved = load_run(write_run(tmp_path / "saved", "quark"))
    older = load_run(write_run(tmp_path / "older", "rft"))
    older.examples = []
    section = examples_section([saved, older], count=1)
    assert f"No saved eval generations (eval_samples.jsonl) in: {older.name}" in section
    assert "quark on a" in section and "quark on b" not in section  # count=1


def test_pairwise_table_is_row_minus_column_paired_by_prompt(tmp_path, capsys):
    run = write_run(tmp_path / "run", "quark")
    per_prompt = {"init": [0.0, 1.0, 2.0], "a/ppo": [1.0, 1.0, 4.0], "b/quark": [0.0, 2.0, 2.0]}
    policies = [
        {"name": name, "metrics": {"per_prompt_reward": means}}
        for name, means in per_prompt.items()
    ]
    assert pairwise_table(policies[:2]) is None  # the paired table already says it
    _, header, rows, text_columns = pairwise_table(policies)
    assert text_columns == 1
    assert header == ["row − column", "init", "ppo", "quark"]
    # ppo - init: differences 1, 0, 2 -> mean 1, SE sqrt(1/3); quark - ppo: -1, 1, -2
    assert rows[1][:2] == ["ppo", "1.000 ± 0.577"] and rows[1][2] == "–"
    assert rows[2][2] == "-0.667 ± 0.882" and rows[1][3] == "0.667 ± 0.882"
    bad = tmp_path / "bad.json"
    policies[1]["metrics"]["per_prompt_reward"] = [1.0]
    bad.write_text(json.dumps({"policies": policies}))
    capsys.readouterr()
    assert main(["report", str(run), "--eval", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    assert f"{bad}: metrics.per_prompt_reward has [1, 3] prompts" in capsys.readouterr().err
