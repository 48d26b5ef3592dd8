"""The paper's figures and the recall views from saved files (notebooks 02, 04, 05, 06; the explorer), never a model.

Our runs: the re-ranked file that `steps.evaluate` writes (`outputs/stage2/<run>/reranked_val[_<category>].pt`, the
top-k file format: the evaluated K candidates in stage-I order with their stage-I and stage-II scores) gives the
stage-I labels, the stage-II re-ranking at the evaluated K and fusion weight (`TopK.reranked`), and the names the
qualitative grids show with the dataset's images. The original's released files (`cirr_top_200_val.pt` /
`fiq_top_200_val_<cat>.pt` and the bare label tensors `*_stageII_labels_val*.pt`) are read when `original_dir` is set;
they hold no re-ranked names, so they give Figure 8 and the recall curves only.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from cirlib import data as cdata
from cirlib import paths, plots
from cirlib.eval import metrics as M
from cirlib.eval.rank_shift import rank_shift
from cirlib.retrieval.topk import TopK, read_topk_dict
from cirlib.run_folder import RunFolder
from cirlib.workbook import steps
from cirlib.workbook.config import AnalysisConfig, ExplorerConfig
from cirlib.workbook.published import resolve_run

QUALITATIVE_TOP = 5  # candidates per stage in a qualitative row
RECALL_KS = (1, 2, 5, 10, 20, 50, 100, 200)  # recall-curve points (those <= K are drawn)
SMOKE_QUALITATIVE = 2  # grid rows when cfg.smoke


def as_numpy(x: Any) -> np.ndarray:
    """A TopK field (torch tensor or numpy array) as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _abs(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else paths.REPO_ROOT / path


def _categories(cfg: Any) -> list[str | None]:
    return list(cdata.get_dataset(cfg.dataset).split_categories(cfg.categories))


def _topk_file(stage1_dir: Path, split: str, category: str | None) -> Path:
    return RunFolder.at(stage1_dir).topk_file(split, category)


def _label_file(stage2_dir: Path, split: str, category: str | None) -> Path:
    return RunFolder.at(stage2_dir).labels_file(split, category)


# ------------------------------------------------------------------------------------------------ recall views


def plot_candidate_recall(cfg: Any) -> Figure:
    """Candidate recall against depth K of the validation top-K file(s): the ceiling a re-ranker of the top K reaches.

    Args:
        cfg: the top-K config (notebook 02) whose stage-I run folder holds `topk_val[_<category>].pt`; the dataset
            and categories are the stage-I run's (its config.json).
    """
    curves, ks = {}, None
    run = cfg.stage1_folder
    trained = run.saved_config()
    dataset = trained["dataset"]
    for cat in cdata.get_dataset(dataset).split_categories(trained.get("categories")):
        path = run.topk_file("val", cat)
        if not path.is_file():
            raise FileNotFoundError(f"no validation top-k file at {path}: run extract_topk with 'val' in topk_splits")
        topk = TopK.from_dict(read_topk_dict(path), source=str(path))
        ks = recall_curve_ks(topk.k) if ks is None else [x for x in ks if x <= topk.k]
        curves[cat or dataset] = M.candidate_recall_at_k(as_numpy(topk.labels), ks)
    return plots.plot_recall_curves(curves, ks, title=f"{cfg.stage1_run}: target within the stage-I top K",
                                    prefix="cand@")


def plot_comparison(comparison: "steps.Comparison") -> Figure:
    """Recall@K of stage I and stage II on the same queries (CIRR: R@K; FashionIQ: the category mean avg_R@K).

    Args:
        comparison: from `steps.evaluate`.
    """
    prefix = "avg_R@" if any(key.startswith("avg_R@") for key in comparison.stage1) else "R@"
    ks = sorted(int(key[len(prefix):]) for key in comparison.stage1
                if key.startswith(prefix) and key[len(prefix):].isdigit() and key in comparison.stage2)
    if not ks:
        raise ValueError(f"no {prefix}K metrics in the comparison: {sorted(comparison.stage1)}")
    return plots.plot_recall_curves({"Stage I": comparison.stage1, "Stage II": comparison.stage2}, ks,
                                    title=f"re-ranking the stage-I top {comparison.k}", prefix=prefix)


# ------------------------------------------------------------------------------------------------ CIRR submission


def submission_report(cfg: Any, files: dict[str, Path]) -> pd.DataFrame:
    """Check each written submission file as the CIRR server would (`submission.validate_cirr_submission`).

    Recall lists are checked for min(50, test gallery - 1) names: 50 on the real test1 split, fewer only for a
    small synthetic gallery.

    Args:
        cfg: the stage-II config (its data_root locates the test1 annotation files).
        files: label -> path, as returned by `steps.submit_cirr` (empty when skipped: an empty table).
    """
    columns = ["file", "metric", "pair ids", "names per list", "problems"]
    if not files:
        return pd.DataFrame(columns=columns)
    root = paths.data_root(cfg.data_root or None)
    dataset = cdata.get_dataset(cfg.dataset)
    rows = []
    for label, path in files.items():
        problems = dataset.check_submission_file(Path(path), root)
        doc = json.loads(Path(path).read_text())
        lists = [v for key, v in doc.items() if key not in ("version", "metric")]
        rows.append({"file": Path(path).name, "metric": doc.get("metric"), "pair ids": len(lists),
                     "names per list": sorted({len(v) for v in lists if isinstance(v, list)}),
                     "problems": "; ".join(problems) or "none"})
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------------ label sources


@dataclass(frozen=True)
class LabelSource:
    """Where one dataset's (category's) stage-I and stage-II validation rankings come from."""

    dataset: str  # a registered dataset name ("cirr" | "fashioniq")
    category: str | None
    what: str  # "ours" | "original"
    stage2_path: Path  # ours: the re-ranked file (top-k format, both scores); original: the bare stage-II label tensor
    stage1_path: Path | None  # original: its stage-I top-K file; ours: None (the re-ranked file holds stage I's order)

    @property
    def name(self) -> str:
        return self.dataset + (f"_{self.category}" if self.category else "")

    def inputs(self) -> list[tuple[str, Path, str]]:
        """(what, path, made by) of each file this source reads."""
        if self.what == "ours":
            return [("re-ranked top-K file", self.stage2_path, "04_stage2_evaluate")]
        made = "the original's release (original_dir=)"
        return [("stage-I top-K file", self.stage1_path, made), ("stage-II label tensor", self.stage2_path, made)]


def _stage2_folder(cfg: AnalysisConfig | ExplorerConfig) -> RunFolder:
    return resolve_run("stage2", cfg.stage2_run, cfg.outputs)


def label_sources(cfg: AnalysisConfig | ExplorerConfig) -> list[LabelSource]:
    """The files to plot, one source per dataset or FashionIQ category.

    The categories (FashionIQ's) are those with a stage-II file; with none, all are listed (and reported missing).

    Args:
        cfg: the analysis config (ours: stage2_run; the original's files: original_dir) or the explorer's (ours).
    """
    original_dir = cfg.original_dir if isinstance(cfg, AnalysisConfig) else ""
    dataset = cdata.get_dataset(cfg.dataset)
    sources = []
    for cat in dataset.split_categories():
        if original_dir:
            s1, s2 = dataset.original_files(_abs(original_dir), cat)
            sources.append(LabelSource(cfg.dataset, cat, "original", s2, s1))
        else:
            sources.append(LabelSource(cfg.dataset, cat, "ours", _stage2_folder(cfg).reranked_file("val", cat), None))
    present = [s for s in sources if s.stage2_path.exists()]
    return present if (dataset.categories and present) else sources


def evaluated_settings(reranked_file: TopK, path: Path | str = "<re-ranked file>") -> tuple[int, float]:
    """K and fusion weight the evaluation that wrote a re-ranked file used (its provenance).

    Args:
        reranked_file: the loaded re-ranked file (stage-I order, with stage-II scores).
        path: the file, for error messages.
    """
    record = (reranked_file.provenance or {}).get("stage2")
    if reranked_file.stage2_scores is None or not isinstance(record, dict):
        raise ValueError(f"{path}: holds no stage-II scores and settings; it is not a re-ranked file written by "
                         "steps.evaluate (re-run notebook 04)")
    return reranked_file.k, float(record.get("fusion_weight", 0.0))


def load_reranked_file(path: Path, dataset: str, stage1_run: str | None = None) -> TopK:
    """Read a run's validation re-ranked file; with stage1_run, check it re-ranks that stage-I run's top-K."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run notebook 04 (evaluate) for this stage-II run")
    topk = TopK.load(path, dataset=dataset, split="val")
    evaluated_settings(topk, path)
    if topk.labels is None:
        raise ValueError(f"{path}: has no labels (a test split?); the figures need validation labels")
    if stage1_run and topk.stage1_run and topk.stage1_run != stage1_run:
        raise ValueError(f"{path}: re-ranks the top-K of stage-I run {topk.stage1_run!r}, but "
                         f"stage1_run={stage1_run!r}: set stage1_run to match")
    return topk


@dataclass(frozen=True)
class LabelPair:
    """Stage-I and stage-II rankings of the same validation queries and the same top-K."""

    source: LabelSource
    topk: TopK  # the top-K in stage-I order (our re-ranked file, or the original's file cut to the labels' N, K)
    reranked: TopK | None  # ours: the stage-II re-ranking at the evaluated K and fusion weight; None: original
    stage1: np.ndarray  # (N, K) bool, stage-I ranking
    stage2: np.ndarray  # (N, K) bool, stage-II re-ranking of the same candidates


def load_label_pair(source: LabelSource, cfg: AnalysisConfig | None = None) -> LabelPair:
    """Read one source's stage-I and stage-II rankings of the same candidates (cfg: check our file's stage-I run).

    Ours: the re-ranked file, re-ordered at the evaluated K and fusion weight. The original's: its top-K file cut
    to the label tensor's rows and K (an evaluation may re-rank only the first rows and the first K).
    """
    if source.what == "ours":
        topk = load_reranked_file(source.stage2_path, source.dataset, cfg.stage1_run if cfg else None)
        reranked = topk.reranked(evaluated_settings(topk, source.stage2_path)[1])
        return LabelPair(source, topk, reranked, as_numpy(topk.labels), as_numpy(reranked.labels))
    for path in (source.stage1_path, source.stage2_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found ({source.what} labels for {source.name})")
    topk = TopK.from_dict(read_topk_dict(source.stage1_path), source=str(source.stage1_path))
    if topk.labels is None:
        raise ValueError(f"{source.stage1_path}: has no labels (a test split?); Figure 8 needs validation labels")
    s2 = torch.load(source.stage2_path, map_location="cpu", weights_only=True)
    if not isinstance(s2, torch.Tensor) or s2.dtype != torch.bool or s2.dim() != 2:
        raise ValueError(f"{source.stage2_path}: expected a bare (N, K) torch.bool tensor, got "
                         f"{type(s2).__name__} {getattr(s2, 'dtype', '')} {tuple(getattr(s2, 'shape', ()))}")
    n, k = s2.shape
    if n > topk.num_queries or k > topk.k:
        raise ValueError(f"{source.stage2_path}: (N, K) = {(n, k)} exceeds the stage-I top-K file "
                         f"{source.stage1_path} ({topk.num_queries} queries, K = {topk.k})")
    topk = topk.head(n).sliced(k)
    return LabelPair(source, topk, None, as_numpy(topk.labels), s2.numpy())


def recall_curve_ks(k: int) -> list[int]:
    """The recall-curve points for a top-K: the standard K values up to K, and K itself."""
    ks = [x for x in RECALL_KS if x <= k]
    return ks if ks and ks[-1] == k else ks + [k]


def rank_shift_table(cfg: AnalysisConfig) -> pd.DataFrame:
    """Mean stage-I / stage-II rank of the targets found in the top-K, as the original notebook prints.

    Args:
        cfg: the analysis config (which files; see `label_sources`).
    """
    rows = []
    for p in (load_label_pair(s, cfg) for s in label_sources(cfg)):
        shift = rank_shift(p.stage1, p.stage2)
        rows.append({"labels": f"{p.source.what}: {p.source.name}", "queries": p.stage1.shape[0], "K": shift.k,
                     "not in top-K": shift.num_missing, "mean rank, stage I": round(shift.mean_rank_stage1, 3),
                     "mean rank, stage II": round(shift.mean_rank_stage2, 3),
                     "brought forward": round(shift.brought_forward, 3)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ qualitative grids


def val_split(cfg: AnalysisConfig | ExplorerConfig, category: str | None) -> cdata.SplitData:
    """The validation split (of a FashionIQ category) whose queries the analysis top-K rows belong to.

    A stage-II run trained with missing_images="drop" (its config.json) evaluated the split without the queries
    whose images are missing: they are left out here too, so row i is still query i.
    """
    sd = cdata.load_split(cfg.dataset, paths.data_root(cfg.data_root or None), "val", category)
    run = _stage2_folder(cfg)
    if run.config_file.is_file() and run.saved_config().get("missing_images", "error") == "drop":
        return cdata.drop_missing(sd)
    return sd


def check_rows_belong_to(topk: TopK, sd: cdata.SplitData, path: Path | str) -> None:
    """Refuse a top-K whose rows are not this split's first queries (another split file, or another dataset root)."""
    if topk.num_queries > len(sd.queries):
        raise ValueError(f"{path} has {topk.num_queries} rows but {sd.dataset} val has {len(sd.queries)} queries: "
                         "the file belongs to another split file")
    if topk.index_names != tuple(sd.gallery):
        raise ValueError(f"{path}: its gallery differs from the {sd.dataset} val split file's (another data_root?)")
    if topk.target_names is not None:
        bad = [i for i, (t, q) in enumerate(zip(topk.target_names, sd.queries)) if t != q.target]
        if bad:
            raise ValueError(f"{path}: row {bad[0]} has target {topk.target_names[bad[0]]!r}, but query {bad[0]} of "
                             f"the split has {sd.queries[bad[0]].target!r} ({len(bad)} such rows)")


def qualitative_rows(cfg: AnalysisConfig, pair: LabelPair) -> list[plots.QualitativeRow]:
    """`n_qualitative` seeded random queries: reference, text, stage-I top-5 and stage-II top-5 (with images)."""
    if pair.reranked is None:
        raise ValueError(f"{pair.source.name}: the original's files hold no re-ranked names; no qualitative grid")
    sd = val_split(cfg, pair.source.category)
    check_rows_belong_to(pair.topk, sd, pair.source.stage2_path)
    n_rows = pair.topk.num_queries
    n = min(cfg.n_qualitative, n_rows, SMOKE_QUALITATIVE if cfg.smoke else cfg.n_qualitative)
    if n < 1:
        raise ValueError(f"n_qualitative must be >= 1, got {cfg.n_qualitative}")
    chosen = sorted(random.Random(cfg.seed).sample(range(n_rows), n))
    top = min(QUALITATIVE_TOP, pair.topk.k)
    image = lambda name: cdata.load_image(sd.image_path(name))  # noqa: E731
    rows = []
    for r in chosen:
        q = sd.queries[r]
        rows.append(plots.QualitativeRow(
            reference=image(q.reference), text=cdata.query_text(q, sd.dataset, sd.split),
            stage1=[(n_, image(n_)) for n_ in pair.topk.sorted_index_names[r, :top]],
            stage2=[(n_, image(n_)) for n_ in pair.reranked.sorted_index_names[r, :top]],
            target=q.target, reference_name=q.reference))
    return rows


# ------------------------------------------------------------------------------------------------ figures


def make_figures(cfg: AnalysisConfig) -> list[Path]:
    """Write Figure 8 rank-shift panels, recall@K curves (stage I vs II) and qualitative grids as PDF + PNG.

    Stable names under `figures_dir` (default <repo>/figures): `fig8_rank_shift_<name>`, `recall_curves_<name>`
    and (our runs only: the original's files hold no re-ranked names) `qualitative_<name>`, where <name> is "cirr"
    or "fashioniq_<category>". Reads files and images only.

    Args:
        cfg: the analysis config.
    Returns:
        the written files, PDF then PNG per figure.
    """
    out_dir = _abs(cfg.figures_dir) if cfg.figures_dir else paths.FIGURES
    pairs = [load_label_pair(s, cfg) for s in label_sources(cfg)]
    written: list[Path] = []
    for pair in pairs:
        src = pair.source
        label = src.name.replace("_", " ") + (" (original)" if src.what == "original" else "")
        shift = rank_shift(pair.stage1, pair.stage2)
        fig = plots.plot_rank_shift(shift, title=None if src.what == "original" else label)
        written += plots.save_figure(fig, plots.rank_shift_figure_name(src.dataset, src.category), out_dir)
        ks = recall_curve_ks(shift.k)
        curves = {"Stage I": M.recall_at_k(pair.stage1, ks), "Stage II": M.recall_at_k(pair.stage2, ks)}
        fig = plots.plot_recall_curves(curves, ks, title=f"{label}: re-ranking the top {shift.k}")
        written += plots.save_figure(fig, f"recall_curves_{src.name}", out_dir)
        if pair.reranked is not None:
            fig = plots.plot_qualitative_grid(qualitative_rows(cfg, pair))
            written += plots.save_figure(fig, f"qualitative_{src.name}", out_dir)
    return written


def figures_html(files: Sequence[Path], width: int = 480) -> Any:
    """An HTML block showing the PNGs among `files` (for display in the notebook).

    Args:
        files: figure paths, e.g. from `make_figures`; non-PNG files are skipped.
        width: displayed width of each image in pixels.
    """
    import base64

    from IPython.display import HTML

    parts = []
    for f in files:
        if Path(f).suffix == ".png":
            data = base64.b64encode(Path(f).read_bytes()).decode()
            parts.append(f'<figure style="display:inline-block;margin:4px"><img width="{width}" '
                         f'src="data:image/png;base64,{data}"/><figcaption>{Path(f).name}</figcaption></figure>')
    return HTML("".join(parts))
