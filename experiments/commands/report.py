"""`quark-alt report RUN_DIR [RUN_DIR ...] -o report.html`: one self-contained page comparing runs.

Everything comes from the files a run already writes: `config.yaml` (the algorithm), each
iteration's `eval.json` (metrics on `data.eval_prompts`, conditioning curve, their fingerprint),
`samples.jsonl` / `scored.jsonl` (how many generations the run had drawn), `timing.json` (wall
time) and the final `eval_samples.jsonl` (example generations). Plots are PNGs embedded as
base64 and the style is inline, so the page needs nothing but itself to be read. Runs evaluated
on different eval prompts are refused: their numbers do not compare.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from alignment.comparison import paired_difference
from alignment.errors import UserError
from alignment.io import atomic_write
from alignment.loop import EVAL_SAMPLES, TIMING
from alignment.plots import Line, plot_lines, png_bytes
from alignment.records import SampleRecord, load_samples

ITERATION_DIR = re.compile(r"iter_(\d+)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    parser.add_argument("-o", "--out", default="report.html", help="HTML page to write")
    parser.add_argument(
        "--eval",
        metavar="FILE.json",
        action="append",
        default=[],
        help="a `quark-alt eval --out` file: add its paired-comparison table (and best-of-N); "
        "repeat for several",
    )
    parser.add_argument(
        "--markdown",
        metavar="FILE.md",
        help="also write the --eval tables as Markdown, for a README",
    )
    parser.add_argument("--examples", type=int, default=3, help="eval prompts shown side by side")


def run(args: argparse.Namespace) -> int:
    if args.examples < 0:
        raise UserError(f"--examples must be >= 0, got {args.examples}")
    if args.markdown and not args.eval:
        raise UserError("--markdown writes the --eval tables; give at least one --eval FILE.json")
    runs = load_runs([Path(r) for r in args.runs])
    eval_reports = [load_eval_report(Path(path)) for path in args.eval]
    page = build_html(runs, eval_reports, examples=args.examples)
    with atomic_write(args.out) as handle:
        handle.write(page)
    print(f"wrote {args.out} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    if args.markdown:
        with atomic_write(args.markdown) as handle:
            handle.write(markdown_tables(eval_reports, args.eval, runs))
        print(f"wrote {args.markdown}")
    return 0


# ---------------------------------------------------------------- gathering


class Table(NamedTuple):
    """One table of an eval report as plain text, for HTML or Markdown; the first
    `text_columns` columns are text (left-aligned)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    text_columns: int = 1


@dataclass
class Run:
    """What the report shows of one run directory."""

    name: str
    algorithm: str
    evals: list[dict]
    """Each iteration's eval.json, by iteration."""
    samples_seen: list[int]
    """Per eval, the generations sampled for training up to that iteration (every one counts)."""
    seconds: float | None
    """Wall time of the stages `timing.json` recorded; None when no file records any."""
    examples: list[SampleRecord] = field(default_factory=list)
    """The final eval's generations (empty when the run did not save them)."""

    @property
    def final(self) -> dict:
        return self.evals[-1]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from err


def _generations(it_dir: Path) -> int:
    for name in ("scored.jsonl", "samples.jsonl"):
        if (it_dir / name).is_file():
            return sum(len(r.generations) for r in load_samples(it_dir / name))
    return 0


def _seconds(path: Path) -> float:
    stages = _read_json(path)
    if not isinstance(stages, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in stages.values()
    ):
        raise UserError(f"{path}: expected {{stage: seconds}}")
    return float(sum(stages.values()))


def load_run(folder: Path) -> Run:
    """Read one run directory; a folder that is no evaluated run is a clear error."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such run directory")
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.yaml (not a quark-alt run directory)")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as err:
        raise UserError(f"{config_path}: invalid YAML ({err})") from err
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: the top level must be a mapping")
    it_dirs = sorted(
        (int(m.group(1)), d)
        for d in folder.glob("iter_*")
        if (m := ITERATION_DIR.fullmatch(d.name)) and d.is_dir()
    )
    evaluated = [(i, d) for i, d in it_dirs if (d / "eval.json").is_file()]
    if not evaluated:
        raise UserError(
            f"{folder}: no iter_*/eval.json (no evaluation finished yet in this run directory)"
        )
    evals, seen = [], []
    generations = {i: _generations(d) for i, d in it_dirs}
    for i, d in evaluated:
        row = _read_json(d / "eval.json")
        if not isinstance(row, dict):
            raise UserError(f"{d / 'eval.json'}: expected a JSON object")
        evals.append({**row, "iteration": i})
        seen.append(sum(n for j, n in generations.items() if j <= i))
    # up to the final eval, as the samples: a half-done next iteration counts in neither
    last = evaluated[-1][0]
    timed = [_seconds(d / TIMING) for i, d in it_dirs if i <= last and (d / TIMING).is_file()]
    final_samples = evaluated[-1][1] / EVAL_SAMPLES
    return Run(
        name=str(folder),
        algorithm=str(config.get("algorithm", "quark")),
        evals=evals,
        samples_seen=seen,
        seconds=sum(timed) if timed else None,
        examples=load_samples(final_samples) if final_samples.is_file() else [],
    )


def describe_heldout(heldout: Any) -> str:
    """A held-out fingerprint (see `evaluation.heldout_fingerprint`) in a few words."""
    if not isinstance(heldout, dict):
        return "no held-out fingerprint recorded"
    ids, digest = heldout.get("prompt_ids"), str(heldout.get("prompts_sha256"))
    return f"{len(ids) if isinstance(ids, list) else '?'} prompts, sha256 {digest[:12]}"


def _fingerprint(run: Run) -> str | None:
    """The run's held-out fingerprint as a comparable string; None when none was recorded."""
    prints = {json.dumps(e.get("heldout"), sort_keys=True) for e in run.evals}
    if len(prints) > 1:
        raise UserError(f"{run.name}: its iterations were evaluated on different eval prompts")
    (only,) = prints
    return None if only == "null" else only


def load_runs(folders: list[Path]) -> list[Run]:
    """Read every run; refuse runs whose held-out sets differ (or cannot be told apart)."""
    runs = [load_run(f) for f in folders]
    groups: dict[str | None, list[str]] = {}
    for run in runs:
        groups.setdefault(_fingerprint(run), []).append(run.name)
    if len(groups) > 1:
        described = []
        for key, names in groups.items():
            described.append(f"{', '.join(names)} ({describe_heldout(json.loads(key or 'null'))})")
        raise UserError(
            "the runs were evaluated on different eval prompts, so their numbers do not "
            f"compare: {'; '.join(described)}"
        )
    return runs


def load_eval_report(path: Path) -> dict:
    """A `quark-alt eval --out` file, checked for the fields the paired table reads."""
    report = _read_json(path)
    policies = report.get("policies") if isinstance(report, dict) else None
    if not isinstance(policies, list) or not all(
        isinstance(p, dict) and "name" in p and isinstance(p.get("metrics"), dict) for p in policies
    ):
        raise UserError(f"{path}: not a `quark-alt eval` report (needs 'policies' with metrics)")
    counts = {
        len(means)
        for p in policies
        if isinstance(means := p["metrics"].get("per_prompt_reward"), list)
    }
    if len(counts) > 1:
        raise UserError(
            f"{path}: metrics.per_prompt_reward has {sorted(counts)} prompts across policies; "
            "one eval scores every policy on the same prompts"
        )
    return report


# ---------------------------------------------------------------- HTML

SE_NOTE = (
    "Eval reward: the loop's evaluation after each iteration on <code>data.eval_prompts</code> "
    "(in the comparison a validation split; its held-out result is the <code>quark-alt eval</code> "
    "section), mean ± standard error over the generations. The conditioning curve and the paired "
    "tables take the prompt as the unit (per-prompt means, paired differences)."
)
STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f0f0f0; }
td.text, th.text { text-align: left; }
.examples td { text-align: left; max-width: 420px; white-space: pre-wrap; }
.prompt { max-height: 9em; overflow: auto; font-size: 0.85em; color: #555; }
.reward { color: #666; font-size: 0.85em; }
img { width: 100%; max-width: 660px; }
td { white-space: nowrap; }
.grid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 0 2em; }
"""


def _num(value: Any, digits: int = 3) -> str:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return f"{value:.{digits}f}" if ok else "–"


def _pm(mean: Any, stderr: Any, digits: int = 3) -> str:
    return f"{_num(mean, digits)} ± {_num(stderr, digits)}"


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """An HTML table; cells are already escaped. The first `text_columns` align left."""

    def cell(tag: str, i: int, value: str) -> str:
        return f"<{tag}{' class=text' if i < text_columns else ''}>{value}</{tag}>"

    head = "".join(cell("th", i, html.escape(h)) for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image(fig: Any, alt: str) -> str:
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _curve(row: dict) -> dict | None:
    curve = row.get("conditioning_curve")
    return curve if isinstance(curve, dict) else None


def _best_minus_worst(curve: dict | None) -> str:
    """A conditioning curve's paired best-minus-worst cell; "–" without a curve."""
    if curve is None:
        return "–"
    return _pm(curve["best_minus_worst"]["mean"], curve["best_minus_worst"]["stderr"])


def _wins(d: dict) -> str:
    return f"{d.get('wins')}/{d.get('ties')}/{d.get('losses')}"


def eval_table(runs: list[Run]) -> str:
    header = ["run", "algorithm", "iteration", "samples used", "eval reward ± SE"]
    header += ["greedy reward", "KL", "ref perplexity", "length", "best − worst control"]
    header += ["wall time (s)"]
    rows = []
    for run in runs:
        final = run.final
        curve = _curve(final)
        rows.append(
            [
                html.escape(run.name),
                html.escape(run.algorithm),
                str(final["iteration"]),
                str(run.samples_seen[-1]),
                _pm(final.get("reward_mean"), final.get("reward_stderr")),
                _num(final.get("greedy_reward_mean")),
                _num(final.get("kl")),
                _num(final.get("ref_perplexity"), 2),
                _num(final.get("length"), 1),
                _best_minus_worst(curve),
                _num(run.seconds, 0),
            ]
        )
    return _table(header, rows, text_columns=2)


def _metric_line(run: Run, xs: list[Any], key: str, err: str | None = None) -> Line:
    return Line(
        run.name,
        xs,
        [e.get(key) for e in run.evals],
        [e.get(err) for e in run.evals] if err else None,
    )


def curve_section(runs: list[Run]) -> str:
    parts = []
    trends = []
    for run in runs:
        curves = [(e["iteration"], c) for e in run.evals if (c := _curve(e))]
        if not curves:
            why = "unconditioned" if run.algorithm not in ("quark", "alt-rm") else "not recorded"
            parts.append(f"<p>{html.escape(run.name)} ({html.escape(run.algorithm)}): {why}.</p>")
            continue
        lines = [
            Line(
                f"iteration {i}",
                [c["quantile"] for c in curve["controls"]],
                [c["reward_mean"] for c in curve["controls"]],
                [c["reward_stderr"] for c in curve["controls"]],
            )
            for i, curve in curves
        ]
        fig = plot_lines(lines, "control (0 = best)", "eval reward", integer_x=True)
        rows = [
            [
                str(i),
                *(_pm(c["reward_mean"], c["reward_stderr"]) for c in curve["controls"]),
                _best_minus_worst(curve),
                _wins(curve["best_minus_worst"]),
            ]
            for i, curve in curves
        ]
        controls = [c["control"] for c in curves[-1][1]["controls"]]
        header = ["iteration", *(f"control {q}" for q in range(len(controls)))]
        header += ["best − worst (paired)", "W/T/L"]
        legend = ", ".join(f"{q} = <code>{html.escape(c)}</code>" for q, c in enumerate(controls))
        parts.append(f"<h3>{html.escape(run.name)} ({html.escape(run.algorithm)})</h3>")
        parts.append(_image(fig, f"conditioning curve of {run.name}"))
        parts.append(f"<p>Controls: {legend}.</p>" + _table(header, rows))
        trends.append(
            Line(
                run.name,
                [i for i, _ in curves],
                [c["best_minus_worst"]["mean"] for _, c in curves],
                [c["best_minus_worst"]["stderr"] for _, c in curves],
            )
        )
    if trends:
        fig = plot_lines(trends, "iteration", "best − worst control (paired)", integer_x=True)
        parts.append("<h3>Best minus worst control, per iteration</h3>")
        parts.append(_image(fig, "best minus worst control per iteration"))
    return "".join(parts)


def _run_of(policy: dict, runs: list[Run]) -> Run | None:
    """The run directory an evaluated policy was named by, when it is one of the report's."""
    named = Path(str(policy["name"])).resolve()
    return next((r for r in runs if Path(r.name).resolve() == named), None)


def _win_rate(paired: dict) -> float | None:
    """Prompts where the policy beat the baseline, a tie counting one half."""
    n = paired.get("n")
    if not isinstance(n, int) or n < 1:
        return None
    return (paired.get("wins", 0) + 0.5 * paired.get("ties", 0)) / n


def eval_tables(report: dict, runs: list[Run]) -> list[Table]:
    """The tables of one `quark-alt eval` report, as plain text: the paired table, best-of-N when
    the eval computed it, and the pairwise differences with three or more policies. The run
    columns (algorithm, samples, wall time) come from the run directory a policy was named by;
    HTML and Markdown render the same rows."""
    header = ["policy", "algorithm", "samples used", "reward ± SE", "paired gain ± SE"]
    header += ["W/T/L", "win rate vs baseline", "win rate vs references", "KL"]
    header += ["ref perplexity", "length", "empty", "best − worst control", "run wall time (s)"]
    rows = []
    for policy in report["policies"]:
        m, paired, curve = policy["metrics"], policy.get("paired_vs_baseline"), _curve(policy)
        run, win = _run_of(policy, runs), m.get("win_rate_vs_references")
        rows.append(
            [
                str(policy["name"]),
                run.algorithm if run else "–",
                str(run.samples_seen[-1]) if run else "–",
                _pm(m.get("reward_mean"), m.get("reward_stderr")),
                _pm(paired.get("mean"), paired.get("stderr")) if paired else "baseline",
                _wins(paired) if paired else "–",
                _num(_win_rate(paired)) if paired else "–",
                _pm(win.get("mean"), win.get("stderr")) if isinstance(win, dict) else "–",
                _num(m.get("kl")),
                _num(m.get("ref_perplexity"), 2),
                _num(m.get("length"), 1),
                _num(m.get("empty_fraction"), 2),
                _best_minus_worst(curve),
                _num(run.seconds, 0) if run else "–",
            ]
        )
    tables = [Table("Paired comparison", header, rows, text_columns=2)]
    best = [
        [
            str(policy["name"]),
            str(row.get("n")),
            str(row.get("samples")),
            _pm(row.get("reward_mean"), row.get("reward_stderr")),
            _pm(row.get("kl_estimate"), row.get("kl_estimate_stderr")),
            _num(row.get("kl_bound")),
        ]
        for policy in report["policies"]
        for row in policy.get("best_of_n") or []
    ]
    if best:
        header = ["policy", "N", "samples", "reward ± SE", "KL estimate ± SE", "KL bound"]
        tables.append(Table("Best of N", header, best))
    if pairwise := pairwise_table(report["policies"]):
        tables.append(pairwise)
    return tables


def pairwise_table(policies: list[dict]) -> Table | None:
    """Every policy against every other on the same prompts: the row's per-prompt reward minus
    the column's, mean ± SE of the differences. The paired table compares each policy with the
    baseline only; this answers "does A beat B" for any two. None with fewer than three."""
    scored = [
        (str(p["name"]), means)
        for p in policies
        if isinstance(means := p["metrics"].get("per_prompt_reward"), list)
    ]
    if len(scored) < 3:
        return None
    header = ["row − column", *(Path(name).name for name, _ in scored)]
    rows = []
    for name, means in scored:
        cells = [Path(name).name]
        for other, other_means in scored:
            if other == name:
                cells.append("–")
                continue
            d = paired_difference(other_means, means)
            cells.append(_pm(d.mean, d.stderr))
        rows.append(cells)
    return Table("Paired differences between policies (reward)", header, rows)


def _settings_note(report: dict) -> str:
    settings = report.get("settings", {})
    return ", ".join(
        f"{k} {settings[k]}"
        for k in ("prompts", "num_prompts", "samples_per_prompt", "seed", "reward")
        if k in settings
    )


def paired_section(report: dict, runs: list[Run]) -> str:
    parts = [f"<p>{html.escape(_settings_note(report))}</p>"]
    for table in eval_tables(report, runs):
        escaped = [[html.escape(cell) for cell in row] for row in table.rows]
        html_table = _table(table.header, escaped, table.text_columns)
        parts.append(f"<h3>{html.escape(table.title)}</h3>" + html_table)
    return "".join(parts)


def markdown_tables(reports: list[dict], paths: list[str], runs: list[Run]) -> str:
    """The --eval tables as GitHub Markdown, each under the file and settings it came from."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    parts = []
    for report, path in zip(reports, paths, strict=True):
        parts.append(f"`{path}`: {_settings_note(report)}\n")
        for title, header, rows, text_columns in eval_tables(report, runs):
            align = ["---" if i < text_columns else "---:" for i in range(len(header))]
            table = [line(header), "| " + " | ".join(align) + " |", *map(line, rows)]
            parts.append(f"**{title}**\n\n" + "\n".join(table) + "\n")
    return "\n".join(parts)


def examples_section(runs: list[Run], count: int, per_run: int = 2) -> str:
    with_examples = [r for r in runs if r.examples]
    missing = [r.name for r in runs if not r.examples]
    note = (
        f"<p>No saved eval generations ({EVAL_SAMPLES}) in: {html.escape(', '.join(missing))}.</p>"
        if missing
        else ""
    )
    if not with_examples or count == 0:
        return note
    by_run = [{rec.id: rec for rec in r.examples} for r in with_examples]
    ids = [rec.id for rec in with_examples[0].examples if all(rec.id in b for b in by_run)]
    rows = []
    for prompt_id in ids[:count]:
        record = by_run[0][prompt_id]
        cells = [f"<div class=prompt>{html.escape(record.prompt)}</div>"]
        for b in by_run:
            rec = b[prompt_id]
            rewards = rec.rewards or [None] * len(rec.generations)
            cells.append(
                "<hr>".join(
                    f"{html.escape(g)}<div class=reward>reward {_num(r)}</div>"
                    for g, r in list(zip(rec.generations, rewards, strict=True))[:per_run]
                )
            )
        rows.append(cells)
    header = ["eval prompt", *(f"{r.name} ({r.algorithm})" for r in with_examples)]
    final = ", ".join(f"{r.name}: iteration {r.final['iteration']}" for r in with_examples)
    return (
        note
        + f"<p>First {per_run} sampled generations per prompt of the final eval ({final}).</p>"
        + _table(header, rows, text_columns=len(header)).replace(
            "<table>", "<table class=examples>"
        )
    )


def metric_plots(runs: list[Run]) -> list[tuple[str, str, str]]:
    """(id, title, <img>) of the per-run metric plots: each run is one line."""
    by_iteration = [[e["iteration"] for e in r.evals] for r in runs]
    frontier = [
        Line(
            r.name,
            [e.get("kl") for e in r.evals],
            [e.get("reward_mean") for e in r.evals],
            [e.get("reward_stderr") for e in r.evals],
            [str(e["iteration"]) for e in r.evals],
        )
        for r in runs
    ]
    figures = [
        (
            "reward",
            "Eval reward against samples seen",
            plot_lines(
                [_metric_line(r, r.samples_seen, "reward_mean", "reward_stderr") for r in runs],
                "generations sampled for training",
                "eval reward (mean ± SE)",
            ),
        ),
        (
            "frontier",
            "Reward against KL (labels: iteration)",
            plot_lines(frontier, "KL(policy || reference), nats", "eval reward"),
        ),
    ]
    for key, title, label in (
        ("length", "Length", "length (tokens)"),
        ("ref_perplexity", "Perplexity under the reference", "perplexity"),
    ):
        lines = [_metric_line(r, xs, key) for r, xs in zip(runs, by_iteration, strict=True)]
        figures.append((key, title, plot_lines(lines, "iteration", label, integer_x=True)))
    return [(key, title, _image(fig, title)) for key, title, fig in figures]


def _section(key: str, title: str, content: str) -> str:
    return f'<section id="{key}"><h2>{html.escape(title)}</h2>{content}</section>'


def build_html(runs: list[Run], eval_reports: list[dict] | None = None, examples: int = 3) -> str:
    """The whole page; every image is inline, so it opens anywhere with no network."""
    held = "Eval prompts: " + describe_heldout(runs[0].final.get("heldout"))
    body = [
        _section("evaluation", "Evaluation (final iteration)", eval_table(runs)),
        "<div class=grid>" + "".join(_section(*plot) for plot in metric_plots(runs)) + "</div>",
        _section("conditioning", "Conditioning curve", curve_section(runs)),
    ]
    if eval_reports:
        paired = "".join(paired_section(report, runs) for report in eval_reports)
        body.append(_section("paired", "Paired comparison (quark-alt eval)", paired))
    body.append(_section("examples", "Example generations", examples_section(runs, examples)))
    names = ", ".join(f"{html.escape(r.name)} ({html.escape(r.algorithm)})" for r in runs)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>quark-alt report</title><style>{STYLE}</style></head><body>"
        f"<h1>quark-alt report</h1><p>Runs: {names}. {held}. {SE_NOTE}</p>"
        f"{''.join(body)}</body></html>\n"
    )
