"""The paper's figures and the recall views from saved artifacts (notebooks 02, 04, 05, 06; the explorer).

Figures are built from files only: the stage-I top-K file (its label matrix) and the stage-II label tensors that
`steps.evaluate` writes (`outputs/stage2/<run>/stage2_labels_val[_<category>].pt`), or the original's released
files (`cirr_top_200_val.pt` / `fiq_top_200_val_<cat>.pt` and `*_stageII_labels_val*.pt`) when `original_dir` is
set. The qualitative grids need the re-ranked *names*, which no saved file holds yet, so for those few queries only
the two saved models are loaded and the re-ranking is recomputed (`rerank_rows`).
"""
from __future__ import annotations

import dataclasses
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
from cirlib.retrieval.rerank import RerankResult, rerank
from cirlib.retrieval.search import encode_gallery, stage1_encoder, stage2_encoder
from cirlib.retrieval.topk import TopK, read_topk_dict
from cirlib.workbook import steps
from cirlib.workbook.config import (
    FASHIONIQ_CATEGORIES,
    AnalysisConfig,
    Stage1Config,
    Stage2Config,
    split_list,
)

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
    return list(split_list(cfg.categories)) if cfg.dataset == "fashioniq" else [None]


def _topk_file(stage1_dir: Path, split: str, category: str | None) -> Path:
    return stage1_dir / steps.topk_name(split, category)


def _label_file(stage2_dir: Path, split: str, category: str | None) -> Path:
    return stage2_dir / steps.label_name(split, category)


# ------------------------------------------------------------------------------------------------ recall views


def plot_candidate_recall(cfg: Stage1Config) -> Figure:
    """Candidate recall against depth K of the validation top-K file(s): the ceiling a re-ranker of the top K reaches.

    Args:
        cfg: the stage-I config whose run folder holds `topk_val[_<category>].pt` (notebook 02).
    """
    curves, ks = {}, None
    for cat in _categories(cfg):
        path = _topk_file(cfg.run_dir, "val", cat)
        if not path.is_file():
            raise FileNotFoundError(f"no validation top-k file at {path}: run extract_topk with 'val' in topk_splits")
        topk = TopK.from_dict(read_topk_dict(path), source=str(path))
        ks = recall_curve_ks(topk.k) if ks is None else [x for x in ks if x <= topk.k]
        curves[cat or cfg.dataset] = M.candidate_recall_at_k(as_numpy(topk.labels), ks)
    return plots.plot_recall_curves(curves, ks, title=f"{cfg.run_name}: target within the stage-I top K",
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


def submission_report(cfg: Stage2Config, files: dict[str, Path]) -> pd.DataFrame:
    """Check each written submission file as the CIRR server would (`submission.validate_cirr_submission`).

    Recall lists are checked for min(50, test gallery - 1) names: 50 on the real test1 split, fewer only for a
    small synthetic gallery.

    Args:
        cfg: the stage-II config (its data_root locates the test1 annotation files).
        files: label -> path, as returned by `steps.submit_cirr` (empty when skipped: an empty table).
    """
    from cirlib.eval import submission

    columns = ["file", "metric", "pair ids", "names per list", "problems"]
    if not files:
        return pd.DataFrame(columns=columns)
    root = paths.data_root(cfg.data_root or None)
    captions = root / "cirr" / "captions" / "cap.rc2.test1.json"
    split = root / "cirr" / "image_splits" / "split.rc2.test1.json"
    gallery = submission.read_gallery_names(split)
    length = min(submission.RECALL_LENGTH, len(gallery) - 1)
    rows = []
    for label, path in files.items():
        problems = submission.validate_cirr_submission(path, captions, gallery, recall_length=length)
        doc = json.loads(Path(path).read_text())
        lists = [v for key, v in doc.items() if key not in ("version", "metric")]
        rows.append({"file": Path(path).name, "metric": doc.get("metric"), "pair ids": len(lists),
                     "names per list": sorted({len(v) for v in lists if isinstance(v, list)}),
                     "problems": "; ".join(problems) or "none"})
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------------ label sources


@dataclass(frozen=True)
class LabelSource:
    """Where one dataset's (category's) stage-I and stage-II validation labels come from."""

    dataset: str  # "cirr" | "fashioniq"
    category: str | None
    stage1_path: Path  # the stage-I top-K file (ours or the original's)
    stage2_path: Path  # the bare stage-II label tensor
    stage1_made_by: str
    stage2_made_by: str
    what: str  # "ours" | "original"

    @property
    def name(self) -> str:
        return self.dataset + (f"_{self.category}" if self.category else "")


def label_sources(cfg: AnalysisConfig) -> list[LabelSource]:
    """The (stage-I top-K file, stage-II label tensor) pairs to plot, one per dataset or FashionIQ category.

    FashionIQ categories are those with a stage-II label file; with none, all three are listed (and reported missing).

    Args:
        cfg: the analysis config (ours: stage1_run / stage2_run; the original's files: original_dir).
    """
    if cfg.dataset not in ("cirr", "fashioniq"):
        raise ValueError(f"dataset must be 'cirr' or 'fashioniq', got {cfg.dataset!r}")
    cats: list[str | None] = list(FASHIONIQ_CATEGORIES) if cfg.dataset == "fashioniq" else [None]
    sources = []
    for cat in cats:
        if cfg.original_dir:
            folder = _abs(cfg.original_dir)
            s1 = folder / ("cirr_top_200_val.pt" if cat is None else f"fiq_top_200_val_{cat}.pt")
            s2 = folder / ("cirr_stageII_labels_val.pt" if cat is None else f"fiq_stageII_labels_val_{cat}.pt")
            made = "the original's release (original_dir=)"
            sources.append(LabelSource(cfg.dataset, cat, s1, s2, made, made, "original"))
        else:
            s1 = _topk_file(paths.OUTPUTS / "stage1" / cfg.stage1_run, "val", cat)
            s2 = _label_file(paths.OUTPUTS / "stage2" / cfg.stage2_run, "val", cat)
            sources.append(LabelSource(cfg.dataset, cat, s1, s2, "02_stage1_topk", "04_stage2_evaluate", "ours"))
    present = [s for s in sources if s.stage2_path.exists()]
    return present if (cfg.dataset == "fashioniq" and present) else sources


@dataclass(frozen=True)
class LabelPair:
    """Stage-I and stage-II label matrices of the same validation queries and the same top-K."""

    source: LabelSource
    topk: TopK  # the stage-I top-K file, cut to the rows and K of the stage-II labels
    stage1: np.ndarray  # (N, K) bool, stage-I ranking
    stage2: np.ndarray  # (N, K) bool, stage-II re-ranking of the same candidates


def load_label_pair(source: LabelSource) -> LabelPair:
    """Read one source's stage-I top-K file and stage-II labels, cut stage I to the stage-II rows and K.

    Our evaluation may re-rank only the first rows (max_val_queries) and only the first K of the top-K; the stage-II
    rows are then the first N stage-I rows, and its K columns permute the first K stage-I candidates.
    """
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
    topk = _head(topk, n).sliced(k)
    return LabelPair(source, topk, as_numpy(topk.labels), s2.numpy())


def _head(topk: TopK, n: int) -> TopK:
    return _rows(topk, list(range(n))) if n < topk.num_queries else topk


def _rows(topk: TopK, rows: Sequence[int]) -> TopK:
    """A TopK holding only the given rows (queries), in that order."""
    idx = np.asarray(rows, dtype=np.int64)

    def pick(a: Any) -> Any:
        return None if a is None else a[torch.from_numpy(idx) if isinstance(a, torch.Tensor) else idx]

    return dataclasses.replace(
        topk, sorted_index_names=pick(topk.sorted_index_names), scores=pick(topk.scores), labels=pick(topk.labels),
        group_labels=pick(topk.group_labels), group_names=pick(topk.group_names),
        target_names=None if topk.target_names is None else tuple(topk.target_names[i] for i in idx))


def recall_curve_ks(k: int) -> list[int]:
    """The recall-curve points for a top-K: the standard K values up to K, and K itself."""
    ks = [x for x in RECALL_KS if x <= k]
    return ks if ks and ks[-1] == k else ks + [k]


def rank_shift_table(cfg: AnalysisConfig) -> pd.DataFrame:
    """Mean stage-I / stage-II rank of the targets found in the top-K, as the original notebook prints.

    Args:
        cfg: the analysis config (which label files; see `label_sources`).
    """
    rows = []
    for p in (load_label_pair(s) for s in label_sources(cfg)):
        shift = plots.rank_shift(p.stage1, p.stage2)
        rows.append({"labels": f"{p.source.what}: {p.source.name}", "queries": p.stage1.shape[0], "K": shift.k,
                     "not in top-K": shift.num_missing, "mean rank, stage I": round(shift.mean_rank_stage1, 3),
                     "mean rank, stage II": round(shift.mean_rank_stage2, 3),
                     "brought forward": round(shift.brought_forward, 3)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ few-query re-ranking


@dataclass
class Models:
    """The two saved models of an analysis, their tokenizer, and the stage-II run's saved config."""

    stage1: Any
    stage2: Any
    tokenizer: Any
    stage2_cfg: Stage2Config
    device: torch.device


def load_models(cfg: AnalysisConfig) -> Models:
    """Load the stage-I and stage-II models the stage-II run was trained with (evaluation mode)."""
    run_dir = paths.OUTPUTS / "stage2" / cfg.stage2_run
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {cfg_path}: run notebook 03 (train_stage2) for stage2_run={cfg.stage2_run!r}")
    saved = json.loads(cfg_path.read_text())
    known = {f.name for f in dataclasses.fields(Stage2Config)}
    s2cfg = Stage2Config(**{k: v for k, v in saved.items() if k in known})
    if not s2cfg.stage1_checkpoint and s2cfg.stage1_run != cfg.stage1_run:
        raise ValueError(f"stage-II run {cfg.stage2_run!r} re-ranks stage-I run {s2cfg.stage1_run!r} "
                         f"(its config.json), but stage1_run={cfg.stage1_run!r}: set stage1_run to match")
    if cfg.data_root:
        s2cfg = dataclasses.replace(s2cfg, data_root=cfg.data_root)
    dev = steps.device()
    stage1, tok = steps.stage1_for(s2cfg)
    stage2 = steps.load_stage2_run(run_dir)
    return Models(stage1.to(dev).eval(), stage2.to(dev).eval(), tok, s2cfg, dev)


def rerank_rows(models: Models, split_data: cdata.SplitData, topk: TopK, rows: Sequence[int], *, k: int,
                fusion_weight: float = 0.0) -> RerankResult:
    """Re-rank a few queries' stage-I top-k with stage II, encoding only the images those queries need.

    Args:
        models: from `load_models`.
        split_data: the split whose queries row i of `topk` belongs to (row i = split_data.queries[i]).
        topk: the stage-I top-K file of that split.
        rows: query rows to re-rank.
        k: candidates re-ranked per query (<= topk.k).
    Returns:
        the re-ranking of those rows only (row j = rows[j]).
    """
    rows = [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < min(topk.num_queries, len(split_data.queries))]
    if bad:
        raise IndexError(f"query rows {bad} outside 0..{min(topk.num_queries, len(split_data.queries)) - 1}")
    queries = [split_data.queries[r] for r in rows]
    sub_topk = _rows(topk, rows).sliced(k)
    needed = {q.reference for q in queries} | set(sub_topk.sorted_index_names.ravel().tolist())
    for q in queries:
        needed |= set(q.members or ())
    # a gallery of only the images these queries touch, in split order: rerank looks candidates up by name
    sub = dataclasses.replace(split_data, queries=queries, gallery=[n for n in split_data.gallery if n in needed])
    size = models.stage2.config.vision.image_size
    transform = cdata.targetpad_transform(models.stage2_cfg.target_ratio, size)
    gallery = encode_gallery(stage2_encoder(models.stage2), sub, transform, device=models.device, desc="images")
    zt_gallery = None
    if models.stage2.config.reranker == "dual" and models.stage2.config.zt_source == "stage1_vit":
        zt_gallery = encode_gallery(stage1_encoder(models.stage1), sub, transform, device=models.device,
                                    desc="stage-I images")
    return rerank(models.stage1, models.stage2, models.tokenizer, sub, sub_topk, gallery, k=k,
                  fusion_weight=fusion_weight, zt_gallery=zt_gallery, queries=queries,
                  max_pairs=models.stage2_cfg.max_pairs, scoring=models.stage2_cfg.scoring, device=models.device)


def evaluation_settings(cfg: AnalysisConfig, fallback_k: int) -> tuple[int, float]:
    """K and fusion weight of the stage-II run's evaluation (metrics.json), else its training config.

    Args:
        cfg: names the stage-II run.
        fallback_k: K when the run has neither file.
    """
    run_dir = paths.OUTPUTS / "stage2" / cfg.stage2_run
    for name in ("metrics.json", "config.json"):
        path = run_dir / name
        if path.is_file():
            saved = json.loads(path.read_text())
            return int(saved.get("k", fallback_k)), float(saved.get("fusion_weight", 0.0))
    return fallback_k, 0.0


def val_split(cfg: AnalysisConfig, category: str | None) -> cdata.SplitData:
    """The validation split (of a FashionIQ category) whose queries the analysis top-K rows belong to."""
    return cdata.load_split(cfg.dataset, paths.data_root(cfg.data_root or None), "val", category)


def qualitative_rows(cfg: AnalysisConfig, pair: LabelPair, models: Models) -> list[plots.QualitativeRow]:
    """`n_qualitative` seeded random queries: reference, text, stage-I top-5 and stage-II top-5 (with images)."""
    sd = val_split(cfg, pair.source.category)
    n_rows = pair.topk.num_queries
    if n_rows > len(sd.queries):
        raise ValueError(f"{pair.source.stage1_path} has {n_rows} rows but {sd.dataset} val has {len(sd.queries)} "
                         "queries: the top-K file belongs to another split file")
    n = min(cfg.n_qualitative, n_rows, SMOKE_QUALITATIVE if cfg.smoke else cfg.n_qualitative)
    if n < 1:
        raise ValueError(f"n_qualitative must be >= 1, got {cfg.n_qualitative}")
    chosen = sorted(random.Random(cfg.seed).sample(range(n_rows), n))
    k, weight = evaluation_settings(cfg, pair.topk.k)
    k = min(k, pair.topk.k)
    result = rerank_rows(models, sd, pair.topk, chosen, k=k, fusion_weight=weight)
    top = min(QUALITATIVE_TOP, k)
    image = lambda name: cdata.load_image(sd.image_path(name))  # noqa: E731
    rows = []
    for j, r in enumerate(chosen):
        q = sd.queries[r]
        rows.append(plots.QualitativeRow(
            reference=image(q.reference), text=cdata.query_text(q, sd.dataset, sd.split),
            stage1=[(n_, image(n_)) for n_ in pair.topk.sorted_index_names[r, :top]],
            stage2=[(n_, image(n_)) for n_ in result.sorted_index_names[j, :top]],
            target=q.target, reference_name=q.reference))
    return rows


# ------------------------------------------------------------------------------------------------ figures


def make_figures(cfg: AnalysisConfig) -> list[Path]:
    """Write Figure 8 rank-shift panels, recall@K curves (stage I vs II) and qualitative grids as PDF + PNG.

    Stable names under `figures_dir` (default <repo>/figures): `fig8_rank_shift_<name>`, `recall_curves_<name>`
    and (our runs only: the original's files hold no re-ranked names) `qualitative_<name>`, where <name> is "cirr"
    or "fashioniq_<category>".

    Args:
        cfg: the analysis config.
    Returns:
        the written files, PDF then PNG per figure.
    """
    out_dir = _abs(cfg.figures_dir) if cfg.figures_dir else paths.FIGURES
    pairs = [load_label_pair(s) for s in label_sources(cfg)]
    written: list[Path] = []
    models = None
    for pair in pairs:
        src = pair.source
        label = src.name.replace("_", " ") + (" (original)" if src.what == "original" else "")
        shift = plots.rank_shift(pair.stage1, pair.stage2)
        fig = plots.plot_rank_shift(shift, title=None if src.what == "original" else label)
        written += plots.save_figure(fig, plots.rank_shift_figure_name(src.dataset, src.category), out_dir)
        ks = recall_curve_ks(shift.k)
        curves = {"Stage I": M.recall_at_k(pair.stage1, ks), "Stage II": M.recall_at_k(pair.stage2, ks)}
        fig = plots.plot_recall_curves(curves, ks, title=f"{label}: re-ranking the top {shift.k}")
        written += plots.save_figure(fig, f"recall_curves_{src.name}", out_dir)
        if src.what == "ours":
            models = models or load_models(cfg)
            fig = plots.plot_qualitative_grid(qualitative_rows(cfg, pair, models))
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
