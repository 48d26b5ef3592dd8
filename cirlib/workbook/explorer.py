"""Notebook 07: an interactive view of one query's stage-I and stage-II rankings, with images.

Stage-I rankings and scores come from the stage-I top-K file; stage-II scores are computed on demand for the chosen
query only (all of its top-K candidates at once, then cached), so changing K or the fusion weight re-sorts without
running a model. `Explorer.ranking` and `Explorer.figure` are the same views without widgets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from cirlib.workbook import figures
from cirlib import plots
from cirlib import data as cdata
from cirlib.eval import metrics as M
from cirlib.workbook.config import AnalysisConfig
from cirlib.retrieval.topk import TopK, read_topk_dict

SHOWN = 8  # candidates drawn per stage in the explorer figure


@dataclass(frozen=True)
class Ranking:
    """One query's top-k before and after re-ranking."""

    row: int  # query row (caption-file order) in the split / top-K file
    text: str
    reference: str
    target: str | None
    stage1_names: np.ndarray  # (k,) stage-I order
    stage1_scores: np.ndarray | None  # (k,) stage-I cosine scores (None for the original's files)
    final_names: np.ndarray  # (k,) stage-II (or fused) order
    final_scores: np.ndarray  # (k,) the scores that define the final order, sorted
    stage2_scores: np.ndarray  # (k,) stage-II logits in stage-I order

    def rank_of_target(self) -> tuple[int | None, int | None]:
        """1-based rank of the target in stage I and after re-ranking (None: not in the top-k / no target)."""
        def find(names: np.ndarray) -> int | None:
            hits = np.flatnonzero(names == self.target) if self.target is not None else []
            return int(hits[0]) + 1 if len(hits) else None

        return find(self.stage1_names), find(self.final_names)

    def table(self) -> pd.DataFrame:
        """Side-by-side ranked names, target marked with '*'."""
        mark = lambda n: f"{n} *" if n == self.target else n  # noqa: E731
        out = pd.DataFrame({"stage I": [mark(n) for n in self.stage1_names],
                            "re-ranked": [mark(n) for n in self.final_names],
                            "score": np.round(self.final_scores, 4)})
        if self.stage1_scores is not None:
            out.insert(1, "stage-I score", np.round(self.stage1_scores, 4))
        out.index = pd.RangeIndex(1, len(out) + 1, name="rank")
        return out


class Explorer:
    """Browse validation queries: stage-I top-K from the file, stage-II scores computed per query on demand."""

    def __init__(self, cfg: AnalysisConfig):
        self.cfg = cfg
        sources = figures.label_sources(cfg)
        self.sources = {s.category: s for s in sources if s.stage1_path.is_file()}
        if not self.sources:
            paths_ = ", ".join(str(s.stage1_path) for s in sources)
            raise FileNotFoundError(f"no stage-I top-k file found ({paths_}): run notebook 02 (extract_topk) for "
                                    f"stage1_run={cfg.stage1_run!r} or set original_dir=")
        self._topk: dict[str | None, TopK] = {}
        self._split: dict[str | None, cdata.SplitData] = {}
        self._scores: dict[tuple[str | None, int], np.ndarray] = {}
        self._models: figures.Models | None = None

    # ---------------------------------------------------------------------------------------------- data
    @property
    def categories(self) -> list[str | None]:
        """FashionIQ categories with a top-K file ([None] for CIRR)."""
        return list(self.sources)

    def _category(self, category: str | None) -> str | None:
        if category is None and self.cfg.dataset == "fashioniq":
            category = self.categories[0]
        if category not in self.sources:
            raise KeyError(f"no top-k file for category {category!r}; have {self.categories}")
        return category

    def topk(self, category: str | None = None) -> TopK:
        """The stage-I top-K file of a category (CIRR: None)."""
        category = self._category(category)
        if category not in self._topk:
            path = self.sources[category].stage1_path
            self._topk[category] = TopK.from_dict(read_topk_dict(path), source=str(path))
        return self._topk[category]

    def split(self, category: str | None = None) -> cdata.SplitData:
        """The validation split the top-K rows belong to."""
        category = self._category(category)
        if category not in self._split:
            sd = figures.val_split(self.cfg, category)
            if self.topk(category).num_queries > len(sd.queries):
                raise ValueError(f"{self.sources[category].stage1_path} has {self.topk(category).num_queries} rows "
                                 f"but the split has {len(sd.queries)} queries: another split file?")
            self._split[category] = sd
        return self._split[category]

    def queries(self, category: str | None = None) -> pd.DataFrame:
        """The browsable queries: text, reference, target and the target's stage-I rank (1-based; 0 = not in top-K)."""
        tk, sd = self.topk(category), self.split(category)
        no_labels = np.zeros(tk.num_queries, int)
        ranks = no_labels if tk.labels is None else M.ranks_from_labels(figures.as_numpy(tk.labels)) + 1
        return pd.DataFrame([{"text": cdata.query_text(q, sd.dataset, sd.split), "reference": q.reference,
                              "target": q.target, "stage-I rank": int(r)}
                             for q, r in zip(sd.queries[:tk.num_queries], ranks)])

    def default_settings(self, category: str | None = None) -> tuple[int, float]:
        """K and fusion weight of the stage-II run's evaluation (else the top-K width and 0)."""
        k, w = figures.evaluation_settings(self.cfg, self.topk(category).k)
        return min(k, self.topk(category).k), (w if self.topk(category).scores is not None else 0.0)

    def stage2_scores(self, row: int, category: str | None = None) -> np.ndarray:
        """(K,) stage-II scores of all the query's top-K candidates, in stage-I order (computed once per query)."""
        category = self._category(category)
        key = (category, int(row))
        if key not in self._scores:
            if self._models is None:
                self._models = figures.load_models(self.cfg)
            tk = self.topk(category)
            res = figures.rerank_rows(self._models, self.split(category), tk, [row], k=tk.k)
            self._scores[key] = res.stage2_scores[0].numpy()
        return self._scores[key]

    def ranking(self, row: int, k: int, fusion_weight: float = 0.0, category: str | None = None) -> Ranking:
        """Re-rank the query's first k stage-I candidates by w * stage I + (1 - w) * stage II.

        Args:
            row: query row.
            k: candidates re-ranked (1..K of the top-K file).
            fusion_weight: w in [0, 1]; needs stage-I scores (our top-K files have them, the original's do not).
        """
        tk, sd = self.topk(category), self.split(category)
        if not 0 <= row < tk.num_queries:
            raise IndexError(f"query row {row} outside 0..{tk.num_queries - 1}")
        if not 1 <= k <= tk.k:
            raise ValueError(f"k must lie in 1..{tk.k}, got {k}")
        if fusion_weight > 0 and tk.scores is None:
            raise ValueError("fusion needs stage-I scores, which this top-k file (an original one) does not hold")
        s2 = self.stage2_scores(row, category)[:k]
        s1 = None if tk.scores is None else figures.as_numpy(tk.scores)[row, :k]
        # the same fusion as cirlib.rerank (rows z-scored: cosine and logit scales differ)
        final = s2 if fusion_weight == 0 else M.fuse_scores(s1[None], s2[None], fusion_weight, normalize=True)[0]
        order = np.argsort(-final, kind="stable")
        names = np.asarray(tk.sorted_index_names)[row, :k]
        q = sd.queries[row]
        return Ranking(row=row, text=cdata.query_text(q, sd.dataset, sd.split), reference=q.reference,
                       target=q.target, stage1_names=names, stage1_scores=s1, final_names=names[order],
                       final_scores=final[order], stage2_scores=s2)

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
                              layout=W.Layout(display="" if self.cfg.dataset == "fashioniq" else "none"))
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
            r = self.ranking(row.value, k.value, weight.value if not weight.disabled else 0.0, cat)
            before, after = r.rank_of_target()
            status.value = (f"<b>{r.text!r}</b> &mdash; target {r.target}: stage-I rank {before or '-'}, "
                            f"re-ranked {after or '-'} (of {k.value})")
            fig = self.figure(row.value, k.value, weight.value if not weight.disabled else 0.0, cat)
            with out:
                out.clear_output(wait=True)
                display(fig)
                display(r.table().head(SHOWN))

        for control in (category, row, k, weight):
            control.observe(render, names="value")
        render()
        return W.VBox([W.HBox([category, row]), W.HBox([k, weight]), status, out])
