"""Figures: the rank-shift numbers by hand, and each figure's structure and saved files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from PIL import Image

from cirlib.eval import metrics
from cirlib.eval.rank_shift import rank_shift, rank_shift_of_ranks
from cirlib import plots
from cirlib.paths import shared_dir

SHARED = shared_dir()
ANALYSIS = SHARED / "data" / "original-artifacts" / "analysis_plot"


def _labels(ranks: list[int] | np.ndarray, k: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    out = np.zeros((len(ranks), k), dtype=bool)
    hit = np.flatnonzero(ranks >= 0)
    out[hit, ranks[hit]] = True
    return out


def _assert_saved(paths):
    pdf, png = paths
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_set_size_matches_the_original_helper():
    w, h = plots.set_size()
    assert w == pytest.approx(496.85625 / 2 / 72.27)
    assert h == pytest.approx(w * 0.6180339887)
    # Figure 8: fraction 1.5, ratio 1/1.4 -> about 5.16 x 3.68 inches
    w, h = plots.set_size(fraction=1.5, ratio=1 / 1.4)
    assert (round(w, 2), round(h, 2)) == (5.16, 3.68)


def test_rank_shift_hand_case():
    # five queries, K = 4; the last has no target in the top-4
    stage1 = _labels([0, 1, 1, 3, -1], 4)
    stage2 = _labels([1, 0, 0, 1, -1], 4)
    shift = rank_shift(stage1, stage2)
    assert shift.counts.tolist() == [1, 2, 0, 1]
    # i=0: 0 - 1 = -1; i=1: 1 - mean(0, 0) = 1; i=2: nobody -> 0; i=3: 3 - 1 = 2
    assert shift.avg_delta.tolist() == [-1.0, 1.0, 0.0, 2.0]
    assert shift.mean_rank_stage1 == 1.25 and shift.mean_rank_stage2 == 0.5
    assert shift.brought_forward == 0.75
    assert shift.num_missing == 1 and shift.k == 4
    # torch tensors give the same numbers
    same = rank_shift(torch.from_numpy(stage1), torch.from_numpy(stage2))
    assert same.avg_delta.tolist() == shift.avg_delta.tolist()
    # from the ranks themselves (a CIRCO query's best-placed ground truth): the same panel
    of_ranks = rank_shift_of_ranks(np.array([0, 1, 1, 3, -1]), np.array([1, 0, 0, 1, -1]), 4)
    assert of_ranks.avg_delta.tolist() == shift.avg_delta.tolist() and of_ranks.num_missing == 1
    with pytest.raises(ValueError, match="below k=4"):
        rank_shift_of_ranks(np.array([4]), np.array([0]), 4)


def test_rank_shift_refuses_inconsistent_label_sets():
    with pytest.raises(ValueError, match=r"row 1 has a hit in stage I only"):
        rank_shift(_labels([0, 2], 3), _labels([0, -1], 3))
    with pytest.raises(ValueError, match=r"row 0 has a hit in stage II only"):
        rank_shift(_labels([-1, 2], 3), _labels([0, 1], 3))
    with pytest.raises(ValueError, match="same \\(N, K\\)"):
        rank_shift(_labels([0], 3), _labels([0], 4))


def test_rank_shift_on_the_original_stage2_labels():
    path = ANALYSIS / "cirr_stageII_labels_val.pt"
    assert path.is_file(), f"missing shared artifact {path}"
    labels = torch.load(path, weights_only=True)
    # the stage-I file is not shipped; against itself the shift is zero and the mean rank is the table's 4.0943
    shift = rank_shift(labels, labels)
    assert not shift.avg_delta.any()
    assert round(shift.mean_rank_stage2, 4) == 4.0943
    assert shift.num_missing == 23 and int(shift.counts.sum()) == 4158


def _synthetic_figure8_labels(seed: int = 0, n: int = 2000, k: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-I ranks decaying with depth, stage II pulling deep targets forward (the shape of the paper's data)."""
    rng = np.random.default_rng(seed)
    r1 = np.minimum(rng.geometric(1 / 25, size=n) - 1, k - 1)
    r1[rng.random(n) < 0.15] = -1
    pull = (r1 * rng.uniform(0.0, 0.6, size=n)).astype(int)
    r2 = np.where(r1 >= 0, np.clip(r1 - pull + rng.integers(-2, 3, size=n), 0, k - 1), -1)
    return torch.from_numpy(_labels(r1, k)), torch.from_numpy(_labels(r2, k))


def test_figure8_panel_from_synthetic_labels(tmp_path):
    stage1, stage2 = _synthetic_figure8_labels()
    shift = rank_shift(stage1, stage2)
    assert shift.brought_forward > 0
    name = plots.rank_shift_figure_name("fashioniq", "dress")
    assert name == "fig8_rank_shift_fashioniq_dress"
    assert plots.rank_shift_figure_name("cirr") == "fig8_rank_shift_cirr"
    fig = plots.plot_rank_shift(shift, save_name=name, out_dir=tmp_path)

    assert tuple(round(v, 2) for v in fig.get_size_inches()) == (5.16, 3.68)
    top, bottom = fig.axes
    assert top.get_yscale() == "linear" and bottom.get_yscale() == "symlog"
    assert top.get_shared_x_axes().joined(top, bottom)
    bars = top.patches
    assert len(bars) == 200
    assert bars[0].get_x() + bars[0].get_width() / 2 == pytest.approx(1.0)  # 1-based x axis
    assert bars[0].get_width() == pytest.approx(0.8)
    assert to_rgba(bars[0].get_facecolor()) == to_rgba("royalblue")
    assert [b.get_height() for b in bars] == pytest.approx(shift.avg_delta.tolist())
    (line,) = bottom.get_lines()
    assert to_rgba(line.get_color()) == to_rgba("chocolate") and line.get_linewidth() == 0.9
    assert line.get_ydata().tolist() == shift.counts.tolist()
    assert top.get_ylabel() == r"Average $\Delta$"
    assert bottom.get_ylabel() == "Number of samples" and bottom.get_xlabel() == "Initial ranking (index)"
    assert fig.axes[0].get_gridspec().hspace == 0
    _assert_saved((tmp_path / f"{name}.pdf", tmp_path / f"{name}.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.pdf", f"{name}.png"]  # no temporaries left


def test_recall_curves(tmp_path):
    ks = (1, 5, 10, 50)
    stage1, stage2 = _synthetic_figure8_labels(seed=1)
    curves = {"Stage I": metrics.recall_at_k(stage1, ks), "Stage II": metrics.recall_at_k(stage2, ks)}
    fig = plots.plot_recall_curves(curves, ks, title="synthetic", save_name="recall_curves", out_dir=tmp_path)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert [line.get_label() for line in ax.get_lines()] == ["Stage I", "Stage II"]
    assert ax.get_lines()[1].get_ydata().tolist() == [curves["Stage II"][f"R@{k}"] for k in ks]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5", "10", "50"]
    _assert_saved((tmp_path / "recall_curves.pdf", tmp_path / "recall_curves.png"))
    with pytest.raises(ValueError, match=r"curve 'Stage I' lacks \['R@100'\]"):
        plots.plot_recall_curves(curves, (1, 100))


def test_qualitative_grid(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)  # noqa: E731
    rows = [
        plots.QualitativeRow(
            reference=Image.fromarray(img()),
            text="make the dog larger and put it on a sofa",
            stage1=[(f"c{j}", img()) for j in range(5)],
            stage2=[(f"c{j}", rng.random((24, 32, 3))) for j in (3, 0, 1, 2, 4)],
            target="c3",
            reference_name="ref-0",
        ),
        plots.QualitativeRow(
            reference=img(), text="", stage1=[(f"d{j}", img()) for j in range(5)],
            stage2=[(f"d{j}", img()) for j in range(5)], target=None,
        ),
    ]
    fig = plots.plot_qualitative_grid(rows, save_name="qualitative", out_dir=tmp_path)
    assert len(fig.axes) == 2 * (1 + 2 * 5)
    framed = [ax for ax in fig.axes if ax.spines["left"].get_visible()]
    # the target c3 is 4th in stage I and 1st in stage II of row 0; row 1 has no target
    assert sorted(ax.get_title() for ax in framed) == ["1. c3", "4. c3"]
    assert all(to_rgba(ax.spines["top"].get_edgecolor()) == to_rgba(plots.TARGET_COLOR) for ax in framed)
    assert fig.axes[0].get_xlabel().replace("\n", " ") == rows[0].text
    _assert_saved((tmp_path / "qualitative.pdf", tmp_path / "qualitative.png"))

    bad = plots.QualitativeRow(reference=img(), text="x", stage1=[("a", img())], stage2=[], target=None)
    with pytest.raises(ValueError, match="row 0: stage1 and stage2"):
        plots.plot_qualitative_grid([bad])
    neg = plots.QualitativeRow(reference=-np.ones((4, 4, 3)), text="x", stage1=[("a", img())], stage2=[("a", img())])
    with pytest.raises(ValueError, match=r"row 0 reference: float images must lie in \[0, 1\]"):
        plots.plot_qualitative_grid([neg])


def _texts_px(fig, shown_width_px: float):
    """Every non-empty text of a drawn figure: (text, bbox, font size in screen pixels) when the figure is shown
    scaled to `shown_width_px` (a notebook shrinks a figure wider than its output area to fit)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    dpi = 100  # the inline backend's figure dpi
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    scale = min(1.0, shown_width_px / (fig.get_figwidth() * dpi))
    out = []
    for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_fontsize")):
        if t.get_visible() and t.get_text().strip():
            out.append((t.get_text(), t.get_window_extent(renderer), t.get_fontsize() * dpi / 72 * scale))
    return out


@pytest.mark.parametrize("n_shown", [5])  # the explorer's SHOWN and notebook 06's QUALITATIVE_TOP
def test_qualitative_grid_is_legible_and_nothing_overlaps(n_shown):
    from cirlib.workbook import explorer, figures

    assert explorer.SHOWN == n_shown and figures.QUALITATIVE_TOP == n_shown
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, size=(40, 60, 3), dtype=np.uint8)  # noqa: E731
    # CIRR-length names and a long caption: the case that ran into the next row before
    names = [f"test1-{1000 + j}-{j % 3}-img{j % 2}" for j in range(n_shown)]
    text = "change the dog to a cat sitting on a wooden bench next to a bicycle in the rain at night"
    rows = [plots.QualitativeRow(reference=img(), text=text, stage1=[(n, img()) for n in names],
                                 stage2=[(n, img()) for n in reversed(names)], target=names[1],
                                 reference_name=f"dev-{r}-0-img0-reference-long") for r in range(3)]
    fig = plots.plot_qualitative_grid(rows)
    texts = _texts_px(fig, shown_width_px=900)  # a JupyterLab output area on a laptop screen
    assert len(texts) >= 3 * (1 + 2 * n_shown)
    small = [(t, round(px, 1)) for t, _, px in texts if px < 10]
    assert not small, f"text below 10 px on screen: {small[:5]}"
    overlaps = [(a, b) for i, (a, ba, _) in enumerate(texts) for (b, bb, _) in texts[i + 1:] if ba.overlaps(bb)]
    assert not overlaps, f"texts drawn over each other: {overlaps[:3]}"


def test_save_figure_rejects_path_like_names(tmp_path):
    fig = plots.plot_recall_curves({"a": {"R@1": 1.0}}, (1,))
    with pytest.raises(ValueError, match="plain file stem"):
        plots.save_figure(fig, "../x", tmp_path)



def test_save_figure_creates_its_folder_and_leaves_no_temporary_files(tmp_path):
    fig = plots.plot_recall_curves({"a": {"R@1": 1.0, "R@5": 2.0}}, (1, 5))
    _assert_saved(plots.save_figure(fig, "curves", tmp_path / "new" / "deeper"))
    assert sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["curves.pdf", "curves.png"]


def _count_tick_labels(fig) -> tuple[tuple[float, float], list[tuple[float, str]], list]:
    """The count axis' limits, its (position, label) ticks inside them, and their drawn bounding boxes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    bottom = fig.axes[1]
    lo, hi = bottom.get_ylim()
    shown = [t for t in bottom.get_yticklabels() if lo <= t.get_position()[1] <= hi and t.get_text()]
    boxes = [t.get_window_extent(canvas.get_renderer()) for t in shown]
    return (lo, hi), [(t.get_position()[1], t.get_text()) for t in shown], boxes


@pytest.mark.parametrize("n, k, expected_ticks", [(5, 100, [0, 1]), (16, 100, [0, 1]), (3000, 20, [0, 1, 10, 100])])
def test_figure8_count_axis_starts_at_zero_without_negative_or_overlapping_labels(n, k, expected_ticks):
    # a small FashionIQ category (a few queries: counts 0 or 1) and a large one; matplotlib's autoscale used to pad
    # the symlog axis below 0 and label the padding "-5x10^-2" right beside "0"
    rng = np.random.default_rng(n)
    r1 = rng.integers(0, k, size=n)
    r2 = np.minimum(r1, rng.integers(0, k, size=n))
    shift = rank_shift(_labels(r1, k), _labels(r2, k))
    (lo, hi), ticks, boxes = _count_tick_labels(plots.plot_rank_shift(shift))
    assert lo == 0 and hi >= shift.counts.max()
    assert [pos for pos, _ in ticks] == expected_ticks
    assert not any(text.startswith(("-", "\N{MINUS SIGN}")) or "{-" in text for _, text in ticks), ticks
    for a, b in zip(boxes, boxes[1:]):
        assert not a.overlaps(b), f"tick labels overlap: {ticks}"


def test_fusion_sweep_plot_draws_one_line_per_metric_and_the_best_weight():
    weights = [0.0, 0.5, 1.0]
    metrics = [{"R@1": 30.0, "Rsubset@1": 40.0, "selection": 35.0}, {"R@1": 35.0, "Rsubset@1": 40.0, "selection": 37.0},
               {"R@1": 8.0, "Rsubset@1": 40.0, "selection": 24.0}]
    fig = plots.plot_fusion_sweep(weights, metrics, best=0.5)
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == ["R@1", "Rsubset@1"]
    assert list(ax.get_lines()[0].get_ydata()) == [30.0, 35.0, 8.0]
    assert [list(line.get_xdata()) for line in ax.get_lines()][-1] == [0.5, 0.5]  # the best weight's marker
    with pytest.raises(ValueError, match="one metrics dict per weight"):
        plots.plot_fusion_sweep(weights, metrics[:2])
