"""Figures: the paper's Figure 8 rank-shift panel, recall@K curves and qualitative retrieval grids.

Functions build `matplotlib.figure.Figure` objects directly (no pyplot state, so they work under the Agg backend,
in scripts and in notebooks, where the returned figure displays once) and return them. Passing `save_name` also
writes `<out_dir>/<save_name>.pdf` and `.png` (out_dir defaults to `cirlib.paths.FIGURES`). Sizes follow the
original's LaTeX helper `set_size`, and its STIX fonts are applied per figure, never globally.
"""
from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.ticker import FixedLocator, NullLocator

from cirlib.eval.rank_shift import RankShift, rank_shift
from cirlib.paths import FIGURES, atomic_write

TEXTWIDTH_PT = 496.85625  # the paper's LaTeX \textwidth; the original plots at half of it
GOLDEN_RATIO = (5**0.5 - 1) / 2
# the original notebook's fonts (mathtext.fontset='stix', font.family='STIXGeneral'), scoped to our figures
_STYLE = {"mathtext.fontset": "stix", "font.family": "STIXGeneral"}
TARGET_COLOR = "limegreen"


def set_size(
    width_pt: float = TEXTWIDTH_PT / 2, fraction: float = 1.0, ratio: float | None = None
) -> tuple[float, float]:
    """Figure (width, height) in inches for a LaTeX column: width_pt * fraction wide, height = width * ratio.

    Args:
        width_pt: the document width in points (default: half the paper's \\textwidth, as the original).
        fraction: share of that width the figure takes.
        ratio: height / width; None = the golden ratio 0.618.
    """
    width_in = width_pt * fraction / 72.27  # TeX points per inch
    return width_in, width_in * (GOLDEN_RATIO if ratio is None else ratio)


def save_figure(
    fig: Figure, name: str, out_dir: str | os.PathLike | None = None, *, dpi: int = 200
) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.pdf` and `<name>.png` atomically; returns both paths.

    Args:
        fig: the figure.
        name: file stem, e.g. "fig8_rank_shift_cirr" (letters, digits, '_', '-', '.').
        out_dir: destination folder, default `cirlib.paths.FIGURES`; created if needed.
    """
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem, got {name!r}")
    folder = Path(out_dir) if out_dir is not None else FIGURES
    paths = []
    for ext in ("pdf", "png"):

        def draw(tmp: Path, ext: str = ext) -> None:
            with matplotlib.rc_context(_STYLE):
                fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight")

        paths.append(atomic_write(folder / f"{name}.{ext}", draw))
    return paths[0], paths[1]


def _maybe_save(fig: Figure, save_name: str | None, out_dir: str | os.PathLike | None) -> Figure:
    if save_name is not None:
        save_figure(fig, save_name, out_dir)
    return fig


# ------------------------------------------------------------------------------------------------ rank shift
def rank_shift_figure_name(dataset: str, category: str | None = None) -> str:
    """Stable file stem of a Figure 8 panel: "fig8_rank_shift_cirr" or "fig8_rank_shift_fashioniq_dress"."""
    return f"fig8_rank_shift_{dataset}" + (f"_{category}" if category else "")


def plot_rank_shift(
    shift: RankShift,
    title: str | None = None,
    *,
    save_name: str | None = None,
    out_dir: str | os.PathLike | None = None,
) -> Figure:
    """The paper's Figure 8 panel: average Δ per initial index (bars) over the number of samples (symlog line).

    Args:
        shift: from `rank_shift`.
        title: optional title above the panel (the paper puts the dataset in the caption instead).
        save_name: file stem to save PDF + PNG under (see `rank_shift_figure_name`); None = do not save.
        out_dir: folder for saving, default `cirlib.paths.FIGURES`.
    """
    x = np.arange(1, shift.k + 1)  # the paper's axis is 1-based
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=set_size(fraction=1.5, ratio=1 / 1.4))
        gs = GridSpec(2, 1, figure=fig, height_ratios=[2, 1], hspace=0)
        top = fig.add_subplot(gs[0])
        bottom = fig.add_subplot(gs[1], sharex=top)
        top.bar(x, shift.avg_delta, width=0.8, color="royalblue")
        top.set_ylabel(r"Average $\Delta$")
        top.grid(linestyle="--", alpha=0.6)
        top.tick_params(labelbottom=False)
        if title:
            top.set_title(title)
        bottom.plot(x, shift.counts, "chocolate", linewidth=0.9)
        _count_axis(bottom, int(np.max(shift.counts, initial=0)))
        bottom.set_ylabel("Number of samples")
        bottom.set_xlabel("Initial ranking (index)")
        bottom.grid(linestyle="--", alpha=0.6)
    return _maybe_save(fig, save_name, out_dir)


def _count_axis(ax, max_count: int) -> None:
    """The panel's "Number of samples" axis: symlog (linear up to 1, then decades) from 0, never below.

    Counts are never negative, but matplotlib's autoscale pads the limits below 0 and, on a small category whose
    counts are all 0 or 1, labels the padding (-5x10^-2 beside 0, overlapping). The axis starts at 0 and ends at 1.5x
    the largest count (at least 1), with ticks 0, 1, 10, 100, ... up to it: a decade apart, so labels never overlap.
    """
    top = max(1, max_count)
    ticks, decade = [0], 1
    while decade <= top:
        ticks.append(decade)
        decade *= 10
    ax.set_yscale("symlog", base=10, linthresh=1, linscale=1)
    ax.set_ylim(0, 1.5 * top)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())


# ------------------------------------------------------------------------------------------------ recall curves
def plot_recall_curves(
    curves: Mapping[str, Mapping[str, float]],
    ks: Sequence[int],
    title: str | None = None,
    *,
    prefix: str = "R@",
    save_name: str | None = None,
    out_dir: str | os.PathLike | None = None,
) -> Figure:
    """Recall@K against K (log x axis), one line per method, e.g. {"Stage I": recalls, "Stage II": recalls}.

    Args:
        curves: label -> {"R@k": percent}, as returned by `metrics.recall_at_k`.
        ks: the K values to draw; every curve must hold all of them.
        prefix: metric key prefix ("R@", or "Rsubset@" for subset curves).
    """
    ks = [int(k) for k in ks]
    if not curves or not ks:
        raise ValueError("plot_recall_curves needs at least one curve and one K")
    for label, rec in curves.items():
        missing = [f"{prefix}{k}" for k in ks if f"{prefix}{k}" not in rec]
        if missing:
            raise ValueError(f"curve {label!r} lacks {missing}; it has {sorted(rec)}")
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=set_size(fraction=1.5))
        ax = fig.add_subplot()
        for label, rec in curves.items():
            ax.plot(ks, [rec[f"{prefix}{k}"] for k in ks], marker="o", markersize=3, linewidth=1.2, label=label)
        if len(ks) > 1 and min(ks) > 0 and max(ks) / min(ks) >= 10:
            ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("K")
        ax.set_ylabel(f"{prefix}K (%)")
        ax.grid(linestyle="--", alpha=0.6)
        ax.legend()
        if title:
            ax.set_title(title)
    return _maybe_save(fig, save_name, out_dir)


def plot_fusion_sweep(
    weights: Sequence[float],
    metrics: Sequence[Mapping[str, float]],
    *,
    keys: Sequence[str] | None = None,
    best: float | None = None,
    title: str | None = None,
) -> Figure:
    """Metrics against the fusion weight w (w * z(first score) + (1 - w) * z(stage-II score)), one line per metric.

    Args:
        weights: the swept weights (x axis).
        metrics: one {metric: percent} per weight (`cirlib.eval.gain.fusion_sweep`).
        keys: the metrics drawn (default: every R@k, Rsubset@k, avg_R@k and mAP@k the dicts hold).
        best: a weight to mark with a vertical line (the sweep's best).
    """
    if not weights or len(weights) != len(metrics):
        raise ValueError(f"need one metrics dict per weight, got {len(weights)} weights and {len(metrics)} dicts")
    drawn = ("R@", "Rsubset@", "avg_R@", "mAP@")
    keys = list(keys) if keys is not None else [k for k in metrics[0] if k.startswith(drawn)]
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=set_size(fraction=1.5))
        ax = fig.add_subplot()
        for key in keys:
            ax.plot(list(weights), [m[key] for m in metrics], marker="o", markersize=3, linewidth=1.2, label=key)
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("fusion weight w of the first stage's score")
        ax.set_ylabel("metric (%)")
        ax.grid(linestyle="--", alpha=0.6)
        ax.legend(fontsize="small")
        if title:
            ax.set_title(title)
    return fig


# ------------------------------------------------------------------------------------------ qualitative grid
@dataclass(frozen=True)
class QualitativeRow:
    """One query of a qualitative grid. Images are PIL images or (H, W[, 3|4]) arrays (uint8, or float in [0, 1])."""

    reference: Any  # the reference image
    text: str  # the modification text
    stage1: Sequence[tuple[str, Any]]  # stage-I top-n (name, image), best first
    stage2: Sequence[tuple[str, Any]]  # stage-II top-n (name, image), best first
    target: str | None = None  # ground-truth target name (framed in green where shown); None for test queries
    reference_name: str = ""


def _as_image(img: Any, where: str) -> np.ndarray:
    if hasattr(img, "convert") and hasattr(img, "size"):  # PIL.Image
        return np.asarray(img.convert("RGB"))
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4)):
        if arr.dtype != np.uint8 and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1):
            raise ValueError(f"{where}: float images must lie in [0, 1] (got range [{arr.min():.3g}, {arr.max():.3g}])")
        return arr
    raise ValueError(f"{where}: expected a PIL image or an (H, W[, 3|4]) array, got shape {arr.shape}")


# Qualitative grids are read on screen, scaled to the notebook's width: type sizes in points at which the names stay
# legible (>= ~10 px) when a 1.3-inch cell is shown at ~75 % of its size.
GRID_CELL_IN = 1.3  # inches per candidate image
GRID_TITLE_PT = 9.0  # candidate names above the images
GRID_TEXT_PT = 10.0  # the reference's modification text and the stage labels
GRID_NAME_CHARS = 20  # a title longer than this wraps (at hyphens first) onto a second line


def _grid_name(name: str) -> str:
    return "\n".join(textwrap.wrap(name, GRID_NAME_CHARS, break_on_hyphens=True)) or name


def _show(ax, img: np.ndarray, caption: str, highlight: bool) -> None:
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(caption, fontsize=GRID_TITLE_PT, pad=3)
    for spine in ax.spines.values():
        spine.set_visible(highlight)
        if highlight:
            spine.set_edgecolor(TARGET_COLOR)
            spine.set_linewidth(3)


def plot_qualitative_grid(
    rows: Sequence[QualitativeRow],
    *,
    save_name: str | None = None,
    out_dir: str | os.PathLike | None = None,
    wrap: int = 24,
) -> Figure:
    """Qualitative results: per query the reference and its text, then stage-I and stage-II top-n, target framed green.

    Each query is a block of two rows: the reference image (spanning both, text below) and the top-n of stage I
    (upper) and stage II (lower). Axes: len(rows) * (1 + 2n).

    Args:
        rows: the queries; all must show the same n for both stages.
        wrap: characters per line of the wrapped text.
    """
    if not rows:
        raise ValueError("plot_qualitative_grid needs at least one row")
    n = len(rows[0].stage1)
    for r, row in enumerate(rows):
        if len(row.stage1) != n or len(row.stage2) != n or n == 0:
            raise ValueError(
                f"row {r}: stage1 and stage2 must both list the same n >= 1 candidates as row 0 ({n}), got "
                f"{len(row.stage1)} and {len(row.stage2)}"
            )
    texts = ["\n".join(textwrap.wrap(row.text, wrap)) or "(empty text)" for row in rows]
    text_lines = max(t.count("\n") + 1 for t in texts)
    # Each block is two image rows plus room for two-line names above each and the reference's text below it, so
    # one query's text never runs into the next query's names.
    cell = GRID_CELL_IN
    title_in = 2.4 * GRID_TITLE_PT / 72  # two lines of names
    text_in = (text_lines + 0.8) * 1.25 * GRID_TEXT_PT / 72
    block_in = 2 * (cell + title_in) + text_in
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(cell * (n + 1.7), block_in * len(rows)), layout="constrained")
        outer = GridSpec(len(rows), 1, figure=fig)
        for r, row in enumerate(rows):
            # column 1 is an empty spacer so the stage labels do not run into the reference's text
            inner = outer[r].subgridspec(2, n + 2, width_ratios=[1.4, 0.3] + [1] * n)
            ref_ax = fig.add_subplot(inner[:, 0])
            _show(ref_ax, _as_image(row.reference, f"row {r} reference"), _grid_name(row.reference_name or "reference"),
                  False)
            ref_ax.set_xlabel(texts[r], fontsize=GRID_TEXT_PT)
            for s, (stage, cands) in enumerate((("Stage I", row.stage1), ("Stage II", row.stage2))):
                for j, (name, img) in enumerate(cands):
                    ax = fig.add_subplot(inner[s, j + 2])
                    image = _as_image(img, f"row {r} {stage} #{j + 1} ({name})")
                    _show(ax, image, _grid_name(f"{j + 1}. {name}"), name == row.target)
                    if j == 0:
                        ax.set_ylabel(stage, fontsize=GRID_TEXT_PT)
    return _maybe_save(fig, save_name, out_dir)


__all__ = [
    "GOLDEN_RATIO",
    "QualitativeRow",
    "RankShift",
    "TEXTWIDTH_PT",
    "plot_qualitative_grid",
    "plot_rank_shift",
    "plot_recall_curves",
    "rank_shift",
    "rank_shift_figure_name",
    "save_figure",
    "set_size",
]
