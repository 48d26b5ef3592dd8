"""Notebook 07: an interactive view of one query's stage-I and stage-II rankings, with images.

Everything comes from the stage-II run's re-ranked files (`reranked_val[_<category>].pt`: the evaluated K candidates
in stage-I order with their stage-I and stage-II scores) and the dataset's images; no model runs. A pair's stage-II
score does not depend on the other candidates, so changing K (up to the evaluated K) or the fusion weight re-orders
from the file (`TopK.reranked`). `Explorer.ranking` and `Explorer.figure` are the same views without widgets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cirlib import data as cdata
from cirlib import plots
from cirlib.eval import metrics as M
from cirlib.retrieval.topk import TopK
from cirlib.workbook import figures
from cirlib.workbook.config import ExplorerConfig

SHOWN = 5  # candidates drawn per stage in the explorer figure (more would shrink the names below legibility)
NOT_IN_TOPK = "-"  # the rank shown for a target that is not among the candidates (table and widget alike)
RANK_COLUMNS = ("stage-I rank", "stage-II rank")


def rank_text(rank: int | None) -> str:
    """A 1-based rank as shown, or NOT_IN_TOPK for None (the target is not in the top-K)."""
    return NOT_IN_TOPK if rank is None else str(rank)


def target_ranks(labels: Any) -> pd.arrays.IntegerArray:
    """(N,) 1-based rank of the target in each row of (N, K) labels, <NA> where the row holds no target (Int64:
    sorts and filters as numbers, the missing ones last)."""
    ranks = M.ranks_from_labels(figures.as_numpy(labels))
    return pd.array([int(r) + 1 if r >= 0 else pd.NA for r in ranks], dtype="Int64")


def show_ranks(table: pd.DataFrame) -> Any:
    """A query table (`Explorer.queries`, any rows or order) as shown: a rank the top-K misses as NOT_IN_TOPK."""
    return (table.style.format(na_rep=NOT_IN_TOPK, subset=[c for c in RANK_COLUMNS if c in table])
            .set_caption(f"rank of the target, 1 = first; {NOT_IN_TOPK} = not in the top-K"))


def query_ranks(tk: TopK, sd: cdata.SplitData, fusion_weight: float) -> pd.DataFrame:
    """Each query of a re-ranked file: text, reference, target, the target's 1-based rank in stage I and after
    re-ranking with `fusion_weight` (RANK_COLUMNS, Int64; <NA>: not in the top-K)."""
    before, after = target_ranks(tk.labels), target_ranks(tk.reranked(fusion_weight).labels)
    queries = sd.queries[:tk.num_queries]
    return pd.DataFrame({"text": [cdata.query_text(q, sd.dataset, sd.split) for q in queries],
                         "reference": [q.reference for q in queries], "target": [q.target for q in queries],
                         RANK_COLUMNS[0]: before, RANK_COLUMNS[1]: after})


def status_line(view: "QueryView", k: int) -> str:
    """The widget's line above the figure: the query's text and where its target ranks in both rankings."""
    before, after = view.rank_of_target()
    return (f"<b>{view.text!r}</b> &mdash; target {view.target}: stage-I rank {rank_text(before)}, "
            f"re-ranked {rank_text(after)} (of {k}; {NOT_IN_TOPK} = not in the top-K)")


@dataclass(frozen=True)
class QueryView:
    """One query's top-k before and after re-ranking: a view over two one-row TopKs."""

    row: int  # query row (caption-file order) in the split / re-ranked file
    text: str
    reference: str
    target: str | None
    stage1: TopK  # this query's first k candidates in stage-I order (one row)
    reranked: TopK  # the same candidates re-ranked with `fusion_weight` (one row)
    fusion_weight: float

    @property
    def stage1_names(self) -> np.ndarray:
        """(k,) names in stage-I order."""
        return self.stage1.sorted_index_names[0]

    @property
    def final_names(self) -> np.ndarray:
        """(k,) names in the re-ranked order."""
        return self.reranked.sorted_index_names[0]

    @property
    def score_name(self) -> str:
        """What `final_scores` holds: the stage-II score itself, or the fused z-score when the weight is above 0."""
        return "stage-II score" if self.fusion_weight == 0 else f"fused z-score (w={self.fusion_weight:g})"

    @property
    def final_scores(self) -> np.ndarray:
        """(k,) the scores that define the re-ranked order, in that order (see `score_name`)."""
        return self.reranked.final_scores(self.fusion_weight)[0].numpy()

    def rank_of_target(self) -> tuple[int | None, int | None]:
        """1-based rank of the target in stage I and after re-ranking (None: not in the top-k / no target)."""
        def find(names: np.ndarray) -> int | None:
            hits = np.flatnonzero(names == self.target) if self.target is not None else []
            return int(hits[0]) + 1 if len(hits) else None

        return find(self.stage1_names), find(self.final_names)

    def table(self) -> pd.DataFrame:
        """Side-by-side ranked names with their scores, target marked with '*'."""
        mark = lambda n: f"{n} *" if n == self.target else n  # noqa: E731
        out = pd.DataFrame({"stage I": [mark(n) for n in self.stage1_names]})
        if self.stage1.scores is not None:
            out["stage-I score"] = np.round(self.stage1.scores[0].numpy(), 4)
        out["re-ranked"] = [mark(n) for n in self.final_names]
        out[self.score_name] = np.round(self.final_scores, 4)
        out.index = pd.RangeIndex(1, len(out) + 1, name="rank")
        return out


class Explorer:
    """Browse the validation queries of a stage-II run's re-ranked files: any K up to the evaluated one, any fusion
    weight; files and images only."""

    def __init__(self, cfg: ExplorerConfig):
        self.cfg = cfg
        sources = figures.label_sources(cfg)
        self.sources = {s.category: s for s in sources if s.stage2_path.is_file()}
        if not self.sources:
            paths_ = ", ".join(str(s.stage2_path) for s in sources)
            raise FileNotFoundError(f"no re-ranked file found ({paths_}): run notebook 04 (evaluate) for "
                                    f"stage2_run={cfg.stage2_run!r}")
        self._topk: dict[str | None, TopK] = {}
        self._split: dict[str | None, cdata.SplitData] = {}

    # ---------------------------------------------------------------------------------------------- data
    @property
    def categories(self) -> list[str | None]:
        """FashionIQ categories with a re-ranked file ([None] for CIRR)."""
        return list(self.sources)

    def _category(self, category: str | None) -> str | None:
        if category is None and cdata.get_dataset(self.cfg.dataset).categories:
            category = self.categories[0]
        if category not in self.sources:
            raise KeyError(f"no re-ranked file for category {category!r}; have {self.categories}")
        return category

    def topk(self, category: str | None = None) -> TopK:
        """The re-ranked file of a category (CIRR: None): the evaluated K candidates in stage-I order, both scores."""
        category = self._category(category)
        if category not in self._topk:
            self._topk[category] = figures.load_reranked_file(self.sources[category].stage2_path, self.cfg.dataset,
                                                              self.cfg.stage1_run)
        return self._topk[category]

    def split(self, category: str | None = None) -> cdata.SplitData:
        """The validation split the file's rows belong to (checked: same gallery, same targets)."""
        category = self._category(category)
        if category not in self._split:
            sd = figures.val_split(self.cfg, category)
            figures.check_rows_belong_to(self.topk(category), sd, self.sources[category].stage2_path)
            self._split[category] = sd
        return self._split[category]

    def default_settings(self, category: str | None = None) -> tuple[int, float]:
        """K and fusion weight of the evaluation that wrote the file."""
        category = self._category(category)
        return figures.evaluated_settings(self.topk(category), self.sources[category].stage2_path)

    def queries(self, category: str | None = None) -> pd.DataFrame:
        """The browsable queries: text, reference, target, and the target's 1-based rank in stage I and after the
        evaluation's re-ranking (Int64; <NA> = not in the top-K, shown as NOT_IN_TOPK by `show_ranks`)."""
        _, weight = self.default_settings(category)
        return query_ranks(self.topk(category), self.split(category), weight)

    def query_table(self, rows: int = 10, category: str | None = None) -> Any:
        """The first `rows` queries as shown (`show_ranks`: a target not in the top-K as NOT_IN_TOPK)."""
        return show_ranks(self.queries(category).head(rows))

    def ranking(self, row: int, k: int, fusion_weight: float = 0.0, category: str | None = None) -> QueryView:
        """Re-rank the query's first k stage-I candidates by w * z(stage I) + (1 - w) * z(stage II).

        Args:
            row: query row.
            k: candidates re-ranked (1 .. the evaluated K).
            fusion_weight: w in [0, 1]; 0 = stage II alone.
        """
        tk, sd = self.topk(category), self.split(category)
        if not 0 <= row < tk.num_queries:
            raise IndexError(f"query row {row} outside 0..{tk.num_queries - 1}")
        if not 1 <= k <= tk.k:
            raise ValueError(f"k must lie in 1..{tk.k} (the evaluated K), got {k}")
        if not 0.0 <= fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must lie in [0, 1], got {fusion_weight}")
        one = tk.rows([row]).sliced(k)
        q = sd.queries[row]
        return QueryView(row=row, text=cdata.query_text(q, sd.dataset, sd.split), reference=q.reference,
                         target=q.target, stage1=one, reranked=one.reranked(fusion_weight),
                         fusion_weight=float(fusion_weight))

    def figure(self, row: int, k: int, fusion_weight: float = 0.0, category: str | None = None) -> Figure:
        """Reference, text, and the first candidates of both rankings (target framed green)."""
        r = self.ranking(row, k, fusion_weight, category)
        sd = self.split(category)
        image = lambda name: cdata.load_image(sd.image_path(name))  # noqa: E731
        n = min(SHOWN, k)
        one = plots.QualitativeRow(reference=image(r.reference), text=r.text, target=r.target,
                                   reference_name=r.reference,
                                   stage1=[(x, image(x)) for x in r.stage1_names[:n]],
                                   stage2=[(x, image(x)) for x in r.final_names[:n]])
        return plots.plot_qualitative_grid([one])

    # ---------------------------------------------------------------------------------------------- widget
    def widget(self) -> Any:
        """An ipywidgets view: pick a category (FashionIQ), a query, K and the fusion weight."""
        import ipywidgets as W
        from IPython.display import display

        cat0 = self.categories[0]
        k0, w0 = self.default_settings(cat0)
        category = W.Dropdown(options=[(c, c) for c in self.categories], value=cat0, description="category",
                              layout=W.Layout(display="" if cdata.get_dataset(self.cfg.dataset).categories else "none"))
        row = W.BoundedIntText(value=0, min=0, max=self.topk(cat0).num_queries - 1, description="query row")
        k = W.IntSlider(value=k0, min=1, max=self.topk(cat0).k, description="K", continuous_update=False)
        weight = W.FloatSlider(value=w0, min=0.0, max=1.0, step=0.05, description="fusion w",
                               disabled=self.topk(cat0).scores is None, continuous_update=False)
        status = W.HTML()
        out = W.Output()

        def render(_change: Any = None) -> None:
            cat = category.value
            row.max = self.topk(cat).num_queries - 1
            k.max = self.topk(cat).k
            weight.disabled = self.topk(cat).scores is None
            w = weight.value if not weight.disabled else 0.0
            r = self.ranking(row.value, k.value, w, cat)
            status.value = status_line(r, k.value)
            fig = self.figure(row.value, k.value, w, cat)
            with out:
                out.clear_output(wait=True)
                display(fig)
                display(r.table().head(SHOWN))

        for control in (category, row, k, weight):
            control.observe(render, names="value")
        render()
        return W.VBox([W.HBox([category, row]), W.HBox([k, weight]), status, out])
