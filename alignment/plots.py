"""PNG plots of a run's per-iteration evaluation metrics.

Rendering goes through matplotlib's Agg canvas on a standalone `Figure` (no pyplot, no global
backend switch, no screen needed), and every file is written with `io.atomic_write`, so a crash
mid-save never leaves a truncated PNG over the previous one.

Plots are a by-product of a run, so missing data never raises: a metric absent from every row is
not drawn, a row without a value (None/NaN/inf) is skipped in that series, and a figure with
nothing to draw still gets written, with a note saying so.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from alignment.io import atomic_write

# Metric keys as the evaluation loop logs them.
ITERATION = "iteration"
REWARD_MEAN = "eval/reward_mean"
REWARD_STDERR = "eval/reward_stderr"
GREEDY_REWARD_MEAN = "eval/greedy_reward_mean"
GREEDY_REWARD_STDERR = "eval/greedy_reward_stderr"
REF_PERPLEXITY = "eval/ref_perplexity"
KL = "eval/kl"
LENGTH = "eval/length"

_DPI = 120
_PANEL_SIZE = (7.0, 3.0)


def _finite(x: object) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def _x_of(row: Mapping[str, object], index: int) -> float:
    # Rows without an iteration number are plotted at their position in the list.
    x = _finite(row.get(ITERATION))
    return float(index) if x is None else x


def _series(
    metrics: Sequence[Mapping[str, object]], key: str, err_key: str | None = None
) -> tuple[list[float], list[float], list[float] | None]:
    """(xs, ys, errs) of the rows where `key` has a finite value; errs None if no row has one."""
    xs: list[float] = []
    ys: list[float] = []
    errs: list[float] = []
    for index, row in enumerate(metrics):
        y = _finite(row.get(key))
        if y is None:
            continue
        xs.append(_x_of(row, index))
        ys.append(y)
        # A point without a usable stderr gets no bar rather than being dropped.
        err = _finite(row.get(err_key)) if err_key else None
        errs.append(0.0 if err is None else err)
    has_errs = err_key is not None and any(_finite(row.get(err_key)) is not None for row in metrics)
    return xs, ys, errs if has_errs else None


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (e.g. to embed in an HTML page)."""
    FigureCanvasAgg(fig)  # attaches the Agg canvas: PNG rendering without any display
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _save(fig: Figure, path: str | Path) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(png_bytes(fig))


def _draw_rewards(ax: Axes, metrics: Sequence[Mapping[str, object]]) -> None:
    for key, err_key, label, marker in (
        (REWARD_MEAN, REWARD_STDERR, "sampled", "o"),
        (GREEDY_REWARD_MEAN, GREEDY_REWARD_STDERR, "greedy", "s"),
    ):
        xs, ys, errs = _series(metrics, key, err_key)
        if xs:
            label += " (mean ± stderr)" if errs is not None else ""
            ax.errorbar(xs, ys, yerr=errs, marker=marker, capsize=3, label=label)
    ax.set_ylabel("reward")
    ax.legend(loc="best")


def _draw_kl_and_length(ax: Axes, metrics: Sequence[Mapping[str, object]]) -> None:
    # KL (nats) and length (tokens) have unrelated scales: one y axis each.
    handles = []
    xs, ys, _ = _series(metrics, KL)
    if xs:
        handles += ax.plot(xs, ys, marker="o", color="tab:red", label="KL(policy || ref)")
        ax.set_ylabel("KL (nats)")
    xs, ys, _ = _series(metrics, LENGTH)
    if xs:
        length_ax = ax.twinx() if handles else ax
        handles += length_ax.plot(xs, ys, marker="s", color="tab:gray", label="length")
        length_ax.set_ylabel("length (tokens)")
    ax.legend(handles=handles, loc="best")


def _draw_perplexity(ax: Axes, metrics: Sequence[Mapping[str, object]]) -> None:
    xs, ys, _ = _series(metrics, REF_PERPLEXITY)
    ax.plot(xs, ys, marker="o", color="tab:green", label="perplexity under reference")
    ax.set_ylabel("perplexity")
    ax.legend(loc="best")


def plot_iterations(metrics: Sequence[Mapping[str, object]], path: str | Path) -> None:
    """Draw evaluation metrics against iteration and save them as one PNG.

    Panels, each drawn only if one of its metrics appears in some row: reward (sampled mean with
    stderr error bars, greedy beside it), KL with length on a second y axis, and perplexity
    under the reference.

    Args:
        metrics: one dict per iteration, with keys such as `iteration`, `eval/reward_mean`,
            `eval/reward_stderr`, `eval/greedy_reward_mean`, `eval/kl`, `eval/length`,
            `eval/ref_perplexity`; other keys are ignored.
        path: the PNG to write (parent folders are created).
    """
    panels = [
        (draw, keys)
        for draw, keys in (
            (_draw_rewards, (REWARD_MEAN, GREEDY_REWARD_MEAN)),
            (_draw_kl_and_length, (KL, LENGTH)),
            (_draw_perplexity, (REF_PERPLEXITY,)),
        )
        if any(_series(metrics, key)[0] for key in keys)
    ]
    fig = Figure(figsize=(_PANEL_SIZE[0], _PANEL_SIZE[1] * max(1, len(panels))))
    if not panels:
        _note(fig.add_subplot(), "no evaluation metrics to plot yet")
        _save(fig, path)
        return
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (draw, _) in zip(axes, panels, strict=True):
        draw(ax, metrics)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("iteration")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


def plot_reward_by_quantile(per_iteration: dict[int, dict[int, float]], path: str | Path) -> None:
    """Draw the mean reward of each quantile, one line per iteration, and save it as a PNG.

    The lines should slope down (quantile 0 holds the highest rewards) and rise from one
    iteration to the next as the policy improves.

    Args:
        per_iteration: {iteration: {quantile: mean reward}}, e.g. from
            `metrics.summarize_rewards_by_quantile`; non-finite values are skipped.
        path: the PNG to write (parent folders are created).
    """
    fig = Figure(figsize=_PANEL_SIZE)
    ax = fig.add_subplot()
    lines = {
        iteration: sorted((q, y) for q, v in by_q.items() if (y := _finite(v)) is not None)
        for iteration, by_q in sorted(per_iteration.items())
    }
    lines = {iteration: points for iteration, points in lines.items() if points}
    if not lines:
        _note(ax, "no rewards by quantile to plot yet")
        _save(fig, path)
        return
    # Early iterations dark, late ones light.
    cmap = colormaps["viridis"]
    for i, (iteration, points) in enumerate(lines.items()):
        color = cmap(i / max(1, len(lines) - 1))
        qs, ys = zip(*points, strict=True)
        ax.plot(qs, ys, marker="o", color=color, label=f"iteration {iteration}")
    quantiles = sorted({q for points in lines.values() for q, _ in points})
    ax.set_xticks(quantiles)
    ax.set_xlabel("quantile (0 = highest reward)")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    _save(fig, path)


@dataclass(frozen=True)
class Line:
    """One series of a comparison plot; points whose x or y is not finite are skipped.

    `errs` (stderr bars, None: no bars) and `notes` (text beside each point, e.g. its
    iteration) are per point when given.
    """

    label: str
    xs: Sequence[float | None]
    ys: Sequence[float | None]
    errs: Sequence[float | None] | None = None
    notes: Sequence[str] | None = None


def plot_lines(lines: Sequence[Line], xlabel: str, ylabel: str, integer_x: bool = False) -> Figure:
    """One panel with a line per series (a run, an iteration), for comparing them.

    A figure with nothing to draw says so instead of showing empty axes.
    """
    fig = Figure(figsize=_PANEL_SIZE)
    ax = fig.add_subplot()
    drawn = set()
    for line in lines:
        n = len(line.xs)
        errs = line.errs if line.errs is not None else [None] * n
        notes = line.notes if line.notes is not None else [""] * n
        points = [
            (x, y, _finite(e) or 0.0, note)
            for x, y, e, note in zip(
                map(_finite, line.xs), map(_finite, line.ys), errs, notes, strict=True
            )
            if x is not None and y is not None
        ]
        if not points:
            continue
        xs, ys, es, texts = zip(*points, strict=True)
        bars = es if line.errs is not None else None
        ax.errorbar(xs, ys, yerr=bars, marker="o", capsize=3, label=line.label)
        for x, y, text in zip(xs, ys, texts, strict=True):
            if text:
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        drawn.update(xs)
    if not drawn:
        _note(ax, "nothing recorded to plot")
        return fig
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if integer_x and len(drawn) <= 12:
        ax.set_xticks(sorted(drawn))  # a tick per point (a lone point gets no fractional axis)
    elif integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return fig
